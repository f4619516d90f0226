"""Many pairs at once: ``register_batch(fixed_list, moving_list, ...) -> list[Result]``.

Pairs that share a method, its static options and their array shapes form a group; each group runs as
ONE ``jax.jit(jax.vmap(fit))`` call of the method's whole coarse-to-fine optimisation
(:mod:`ppreg.methods`: the same ``fit`` function :func:`ppreg.register` runs eagerly for one pair),
sharded over the devices (data parallel: a 1-D :class:`jax.sharding.Mesh` named ``"batch"`` and a
:class:`jax.sharding.NamedSharding` that splits the leading axis; the batch is padded to a multiple of
the device count by repeating its last pair, and the padding is dropped). Compiled functions are cached
per (method, static options), so a second call with the same shapes compiles nothing.

Vmapped (one computation per group): ``translation``, ``rigid``, ``affine`` (Gauss-Newton on SSD, or
gradient descent on mi/ncc, with or without URS sampling), ``bspline`` (clear, every voxel), ``svf``
(any loss, plain or symmetric), ``dense`` (adam or lbfgs), and the pipelines ``rigid|affine + bspline|svf|dense``
(the linear stage batched, then the deformable stage batched). Not batched: ``secure`` runs, ``flash``,
``vxm-diff`` and the sampled B-spline (refused with a ValueError: run :func:`ppreg.register` per pair).

Per-pair preparation (world-space start, scaling) and the final warp run on the host, pair by pair, as
in :func:`ppreg.register`; a pair's ``time_s["party1"]`` is its group's optimisation time divided by the
group size plus its own preparation.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .methods import METHODS, make_result, method_name, resolve_options, setup_pair
from .options import DEFORMABLE, LINEAR_STAGE_LOSS, LOSSES, PIPELINES, as_array, check_options
from .result import Result
from .space import check_init
from .transforms import KINDS

MIXED = ("group", "error")
BATCHED = KINDS + DEFORMABLE + PIPELINES  # the transforms register_batch runs (module docstring)
# register()'s defaults of the clear options a method reads (the others default to None: resolve_options)
_DEFAULTS = {"sampling": None, "fraction": 0.1, "spacing": 4, "cg_iterations": 10, "bins": 32, "fluid_sigma": None,
             "diffusion_sigma": 0.5, "symmetric": None, "optimizer": None, "key": 0}
_OPTIONS = set(_DEFAULTS) | {"max_iterations", "tol", "damping", "step_size", "regularization"}
# register's options that have no batched form: register_batch refuses them when they are set
_UNBATCHED = frozenset({"secure", "flash_options", "model", "samples", "audit", "seeds", "frac_bits", "ckks_variant",
                        "lncc_open"})
_COMPILED: dict = {}  # (method, static options, argument counts) -> jitted vmapped fit


def _batched_fit(name: str, static: dict, n_arrays: int, n_shared: int):
    """The jitted, vmapped ``fit`` of a method for one set of static options (cached)."""
    key = (name, tuple(sorted(static.items())), n_arrays, n_shared)
    fn = _COMPILED.get(key)
    if fn is None:
        fit = partial(METHODS[name].fit, **static)
        fn = jax.jit(jax.vmap(fit, in_axes=(0,) * n_arrays + (None,) * n_shared))
        _COMPILED[key] = fn
    return fn


def batch_mesh(devices=None) -> Mesh:
    """A 1-D device mesh with axis ``"batch"`` over ``devices`` (default: every device,
    ``jax.devices()``; on a multi-host cluster after ``jax.distributed.initialize()``, every process's)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("no devices to shard the batch over")
    return Mesh(np.asarray(devices), ("batch",))


def _shard(stacked, mesh: Mesh, spec=PartitionSpec("batch")):
    """A global array on the mesh from a host array every process holds whole (``jax.make_array_from_callback``,
    so it also builds arrays over several hosts' devices): split along the leading axis (``B`` a multiple of
    the device count), or replicated with ``spec=PartitionSpec()``."""
    sharding = NamedSharding(mesh, spec)
    if isinstance(stacked, jax.Array) and jax.dtypes.issubdtype(stacked.dtype, jax.dtypes.prng_key):
        # device_put refuses a sharding over other hosts' devices: place the key's raw words, then rewrap
        return jax.random.wrap_key_data(_shard(jax.random.key_data(stacked), mesh, spec),
                                        impl=jax.random.key_impl(stacked))
    host = np.asarray(stacked)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _gather(x) -> np.ndarray:
    """A host copy of a global array (on several hosts: ``process_allgather``, so every process gets every
    pair's result)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _run_group(name, members, static, mesh):
    """One group through its batched fit: ``members`` is a list of ``(index, pair, arrays, shared)``.
    Returns ``(outputs, stats, seconds)`` with the leading axis the member order (padding dropped)."""
    n, n_dev = len(members), mesh.devices.size
    padded = members + [members[-1]] * (-n % n_dev)
    arrays = [np.stack([np.asarray(m[2][j]) for m in padded]) for j in range(len(members[0][2]))]
    arrays = [_shard(a, mesh) for a in arrays]
    shared = [_shard(s, mesh, PartitionSpec()) for s in members[0][3]]
    fn = _batched_fit(name, static, len(arrays), len(shared))
    start = time.perf_counter()
    out, stats = jax.block_until_ready(fn(*arrays, *shared))
    seconds = time.perf_counter() - start
    out = _gather(out)[:n]
    stats = jax.tree_util.tree_map(lambda x: _gather(x)[:n], stats)
    return out, stats, seconds


def _static_key(static: dict):
    return tuple(sorted(static.items()))


def register_batch(fixed_list, moving_list, *, transform: str = "rigid", loss: str = "ssd",
                   levels: tuple[int, ...] = (4, 2, 1), init: str = "header", mixed: str = "group", devices=None,
                   errors: str = "raise", **options) -> list:
    """Register ``moving_list[i]`` to ``fixed_list[i]`` for every ``i``, same-shape pairs in one vmapped,
    jitted computation per group, sharded over ``devices`` (module docstring).

    Args:
        fixed_list, moving_list: sequences of the same length ``B >= 1`` of ``(*spatial)`` arrays or
            :class:`~ppreg.image.Image` (2D or 3D; float32 inside).
        transform, loss, levels, init: as :func:`ppreg.register` (one value for every pair).
        mixed: ``"group"`` (default): pairs of different shapes (or voxel sizes, which change the static
            options) run as separate groups, one compilation each; ``"error"``: a ValueError when the
            batch holds more than one group.
        devices: the devices to shard over (default ``jax.devices()``).
        errors: ``"raise"`` (default): the first bad pair raises, naming its index; ``"return"``: its
            entry of the returned list is the exception (ValueError, TypeError, FloatingPointError) and
            the other pairs still run.
        **options: the other clear options of :func:`ppreg.register` (max_iterations, tol, damping,
            spacing, regularization, cg_iterations, bins, step_size, fluid_sigma, diffusion_sigma,
            symmetric, optimizer, key, sampling, fraction, histogram_matching), one value for every pair.

    Returns:
        a list of ``B`` :class:`~ppreg.result.Result` in input order, each equal to ``register(fixed_list[i],
        moving_list[i], ...)`` up to float32 reassociation (``tests/test_batch.py`` states the bound).

    Raises:
        ValueError: lists of different lengths or empty, an unknown or unbatched option (secure, flash,
            vxm-diff, sampled B-spline), a bad pair (``errors="raise"``: ``"pair i: ..."``), mixed groups
            with ``mixed="error"``. FloatingPointError: a pair diverged (``errors="raise"``).
    """
    fixed_list, moving_list = list(fixed_list), list(moving_list)
    if len(fixed_list) != len(moving_list) or not fixed_list:
        raise ValueError(f"register_batch needs two non-empty lists of the same length, got {len(fixed_list)} "
                         f"fixed and {len(moving_list)} moving images")
    if mixed not in MIXED:
        raise ValueError(f"unknown mixed={mixed!r}; expected one of {MIXED}")
    if errors not in ("raise", "return"):
        raise ValueError(f"unknown errors={errors!r}; expected 'raise' or 'return'")
    if options.pop("histogram_matching", False):
        return _register_batch_matched(fixed_list, moving_list, transform=transform, loss=loss, levels=levels,
                                       init=init, mixed=mixed, devices=devices, errors=errors, **options)
    unbatched = _UNBATCHED & {k for k, v in options.items() if v is not None}
    if unbatched or transform in ("flash", "vxm-diff", "suits"):
        raise ValueError(f"register_batch runs clear registration (not {sorted(unbatched) or transform}); "
                         "run ppreg.register per pair")
    check_init(init)
    unknown = set(options) - _OPTIONS - _UNBATCHED
    if unknown:
        raise TypeError(f"register_batch got unknown options {sorted(unknown)}")
    if transform not in BATCHED or loss not in LOSSES:
        raise ValueError(f"register_batch takes the transforms {BATCHED} and the losses {LOSSES}, got "
                         f"transform={transform!r}, loss={loss!r} (run ppreg.register per pair for the others)")
    if transform in PIPELINES:
        return _register_batch_pipeline(fixed_list, moving_list, transform=transform, loss=loss, levels=levels,
                                        init=init, mixed=mixed, devices=devices, errors=errors, **options)
    options = dict(_DEFAULTS, **options)
    if transform == "bspline" and options["sampling"] is not None:
        raise ValueError("the sampled B-spline runs its own per-iteration loop: run ppreg.register per pair")
    o = resolve_options(transform, loss, levels, options)
    mesh = batch_mesh(devices)
    name = method_name(transform, loss)
    results: list = [None] * len(fixed_list)
    groups: dict = {}
    prep_time = {}
    for i, (fixed, moving) in enumerate(zip(fixed_list, moving_list)):
        start = time.perf_counter()
        try:
            fixed_a, moving_a = as_array(fixed, "fixed"), as_array(moving, "moving")
            if fixed_a.ndim != moving_a.ndim:
                raise ValueError(f"fixed is {fixed_a.ndim}D but moving is {moving_a.ndim}D")
            check_options(transform, loss, None, o["sampling"], levels, fixed_a.ndim, o["max_iterations"], o["tol"],
                          o["damping"])
            pair = setup_pair(fixed, moving, fixed_a, moving_a, transform=transform, secure=None, init=init)
            arrays, shared, static = METHODS[name].plan(pair, o)
        except (ValueError, TypeError, ArithmeticError) as exc:
            _fail(results, i, exc, errors)
            continue
        shapes = tuple(np.shape(a) for a in arrays)
        groups.setdefault((_static_key(static), shapes), (static, []))[1].append((i, pair, arrays, shared))
        prep_time[i] = time.perf_counter() - start
    if mixed == "error" and len(groups) > 1:
        kinds = sorted({tuple(tuple(s) for s in shapes) for (_, shapes) in groups})
        raise ValueError(f"register_batch(mixed='error') got pairs of {len(groups)} kinds (array shapes "
                         f"{kinds}, or different voxel sizes); pass mixed='group' or batch them apart")
    for static, members in groups.values():
        out, stats, seconds = _run_group(name, members, static, mesh)
        for j, (i, pair, _, _) in enumerate(members):
            start = time.perf_counter()
            if not np.all(np.isfinite(out[j])):
                _fail(results, i, FloatingPointError(
                    "registration diverged: the transform is not finite; try more damping or coarser levels"), errors)
                continue
            stats_j = jax.tree_util.tree_map(lambda x, j=j: x[j], stats)
            try:  # host-side, per pair: a failure here is this pair's (errors="return"), not the batch's
                fitted = METHODS[name].finish(pair, out[j], stats_j, o)
                elapsed = prep_time[i] + seconds / len(members) + time.perf_counter() - start
                results[i] = make_result(pair, transform, fitted, levels=levels, spacing=o["spacing"],
                                         elapsed=elapsed)
            except (ValueError, TypeError, ArithmeticError) as exc:
                _fail(results, i, exc, errors)
    return results


def _fail(results, i, exc, errors):
    """Record (``errors="return"``) or raise a pair's error, its message prefixed with the pair index."""
    exc = type(exc)(f"pair {i}: {exc}")
    if errors == "raise":
        raise exc
    results[i] = exc


def _register_batch_pipeline(fixed_list, moving_list, *, transform, loss, levels, init, **kw) -> list:
    """``linear+deformable`` for many pairs: the linear stage batched, then the deformable stage batched on
    the aligned images, composed per pair as :func:`ppreg.register` does
    (:func:`ppreg.register.pipeline_result`)."""
    from .register import aligned_moving, pipeline_result

    lin, deform = transform.split("+")
    if deform not in DEFORMABLE or kw.get("sampling") is not None:
        raise ValueError(f"the {transform} pipeline runs clear with every voxel in this version")
    common = {k: kw[k] for k in ("mixed", "devices", "errors")}
    first = register_batch(fixed_list, moving_list, transform=lin, loss=LINEAR_STAGE_LOSS.get(loss, loss),
                           levels=levels, init=init, key=kw.get("key", 0), bins=kw.get("bins", 32), **common)
    ok = [i for i, r in enumerate(first) if isinstance(r, Result)]
    if not ok:  # errors="return" and every pair failed the linear stage: nothing left for the second
        return first
    deform_kw = {k: v for k, v in kw.items() if k not in common}
    second = register_batch([fixed_list[i] for i in ok], [aligned_moving(fixed_list[i], first[i]) for i in ok],
                            transform=deform, loss=loss, levels=levels, **common, **deform_kw)
    out = list(first)
    for i, res in zip(ok, second):
        out[i] = (pipeline_result(fixed_list[i], moving_list[i], transform, first[i], res) if isinstance(res, Result)
                  else _renumbered(res, i))
    return out


def _renumbered(exc: Exception, i: int) -> Exception:
    """A sub-batch error (``"pair j: ..."``, ``j`` its place in the sub-batch) renamed to pair ``i``."""
    return type(exc)(f"pair {i}: {str(exc).split(': ', 1)[-1]}")


def _register_batch_matched(fixed_list, moving_list, *, errors, **kw) -> list:
    """``histogram_matching=True``: each moving image matched to its fixed one
    (:func:`ppreg.intensity.match_moving`), the batch registered, and each result given the warped image
    and loss of its original moving image, as :func:`ppreg.register` does."""
    from .intensity import match_moving

    out: list = [None] * len(fixed_list)
    ok, matched = [], []
    for i, (fixed, moving) in enumerate(zip(fixed_list, moving_list)):
        try:
            matched.append(match_moving(fixed, moving))
            ok.append(i)
        except (ValueError, TypeError) as exc:
            _fail(out, i, exc, errors)
    if not ok:
        return out
    results = register_batch([fixed_list[i] for i in ok], matched, errors=errors, **kw)
    for i, res in zip(ok, results):
        out[i] = (res.with_moving(as_array(fixed_list[i], "fixed"), as_array(moving_list[i], "moving"))
                  if isinstance(res, Result) else _renumbered(res, i))
    return out
