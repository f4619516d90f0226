"""VoxelMorph 0.3.4 (PyTorch) as a peer of ppreg's learned registration (optional benchmark extra).

The peer is trained on exactly the batches ppreg's own model sees: :func:`train_vxmdense` takes a
Python iterator of ``{"fixed": (B, *inshape), "moving": (B, *inshape)}`` float32 arrays in [0, 1]
(ppreg's JAX synthesis) and runs VoxelMorph's standard unsupervised objective on them,

    L = sim(fixed, moving o phi) + reg_weight * Grad_l2(flow),

with ``sim`` the MSE scaled by ``1 / image_sigma**2`` (VoxelMorph's ``MSE(image_sigma)``) or minus
the squared local NCC (window 9), and ``Grad_l2`` the mean squared forward difference of the
(pre-integration) flow, averaged over the axes. Adam, one batch per step.

VoxelMorph 0.3.4 is a PyTorch-only rewrite: there is no ``VXM_BACKEND`` / ``NEURITE_BACKEND``
switch any more (``import voxelmorph`` imports ``voxelmorph.nn``, built on torch and
``neurite.nn``), and the 0.2 names ``voxelmorph.torch.networks.VxmDense``, ``layers`` and
``losses.NCC/MSE/Grad`` are gone (``voxelmorph.nn.losses.*`` only raise ``NotImplementedError``
pointing to ``neurite.nn.modules.MSE/NCC/SpatialGradient``). The network here is therefore the
package's own ``voxelmorph.nn.models.VxmPairwise`` (a ``neurite`` ``BasicUNet`` on the
concatenated ``[moving, fixed]`` plus a 3x3 flow convolution initialised N(0, 1e-5)), configured
like the classic VxmDense defaults as far as ``BasicUNet`` allows:

* features: encoder 16, 32, 32, 32 (conv + 2x max-pool each), bottleneck 32 at 1/16 resolution,
  decoder 32, 32, 32, 32 (upsample, concatenate the skip, conv); classic VxmDense's two extra
  16-feature full-resolution convolutions do not exist in ``BasicUNet``, whose head is instead a
  1x1 conv to ``ndim`` channels followed by the 3x3 flow conv (102,040 parameters in 2D against
  109,170 for classic VxmDense);
* LeakyReLU(0.2) activations and nearest-neighbour upsampling, as classic VxmDense (0.3.4's own
  defaults are ReLU and linear upsampling; pass ``activation="relu", upsample_mode="linear"``).

``int_steps=0`` is plain VoxelMorph: the network output is the displacement. ``int_steps > 0`` is
VoxelMorph-diff's diffeomorphic variant, assembled from the package's layers exactly as the
classic VxmDense did it: the output is a stationary velocity, resized to ``1 / int_downsize``
resolution (``ResizeDisplacementField``), integrated by scaling and squaring
(``IntegrateVelocityField``, ``int_steps`` squarings) and resized back; the Grad penalty is then
taken on the downsampled velocity with ``loss_mult = int_downsize`` (classic ``train.py``; that
script also applied ``loss_mult = int_downsize`` when ``int_steps == 0``, which here corresponds to
doubling ``reg_weight``). 0.3.4's ``VxmPairwise(integration_steps=...)`` would integrate at full
resolution and ignores its ``resize_integrated_fields`` flag, hence the explicit assembly.

Conventions. ``voxelmorph.nn.modules.SpatialTransformer(moving, flow)`` samples ``moving`` at
``x + flow(x)`` with ``flow`` channels-first ``(B, ndim, *spatial)``, channel k along array axis k
(``neurite.volshape_to_ndgrid`` builds an ij-indexed grid, and the channels are flipped to the xy
order of ``grid_sample`` only inside the call), in voxels, with ``align_corners=True`` and zero
padding. That is ppreg's pull-back ``warped(x) = moving(x + u(x))`` with ``u`` moved to channels
last; the only difference is the border rule (ppreg keeps the edge value within half a voxel
outside the image, ``grid_sample`` fades to zero there). :func:`check_convention` verifies this
against ``ppreg.warp.warp_displacement``. :func:`predict` returns the displacement channel-last.

Importing this module needs neither torch nor voxelmorph; :func:`available` says whether they are
installed (torch CPU wheel, ``voxelmorph==0.3.4``, ``neurite``; the ``bench`` extra).

Source: G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag, A. V. Dalca, "VoxelMorph: A Learning
Framework for Deformable Medical Image Registration", IEEE TMI 38(8), 2019 (Eq. 2-4: MSE/NCC +
lambda * sum ||grad u||^2); A. V. Dalca, G. Balakrishnan, J. Guttag, M. R. Sabuncu, "Unsupervised
learning of probabilistic diffeomorphic registration for images and surfaces", MedIA 57, 2019
(scaling and squaring of a stationary velocity at half resolution).

Usage (self-check): python bench/peer_voxelmorph.py
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

VXM_VERSION = "0.3.4"
#: Classic VxmDense widths mapped onto ``BasicUNet``'s asymmetric ``[[down], [up]]`` form.
CLASSIC_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32))
NCC_WINDOW = 9
_CHECKPOINT_FORMAT = "ppreg-peer-voxelmorph"


def available() -> bool:
    """Whether torch, neurite and VoxelMorph 0.3.x (the PyTorch ``voxelmorph.nn`` API) are installed.

    Returns:
        True when ``import voxelmorph`` would give the 0.3 API this module uses. Imports nothing.
    """
    if any(importlib.util.find_spec(name) is None for name in ("torch", "neurite", "voxelmorph")):
        return False
    try:
        version = importlib.metadata.version("voxelmorph")
    except importlib.metadata.PackageNotFoundError:
        return False
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return major_minor >= (0, 3)


def versions() -> dict:
    """Installed versions of torch, voxelmorph and neurite (None where missing), for result metadata."""
    out = {}
    for name in ("torch", "voxelmorph", "neurite"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=None)
def _classes():
    """Build the torch module classes on first use (keeps the module importable without torch)."""
    import torch
    import voxelmorph as vxm
    from torch import nn

    class LeakyReLU02(nn.LeakyReLU):
        """LeakyReLU with slope 0.2 (classic VoxelMorph), constructible without arguments."""

        def __init__(self):
            super().__init__(negative_slope=0.2)

    class VxmDensePeer(nn.Module):
        """``VxmPairwise`` + (optional) half-resolution scaling-and-squaring, as classic VxmDense.

        ``forward(moving, fixed)`` takes ``(B, 1, *spatial)`` tensors and returns
        ``(displacement, preint)``, both channels-first ``(B, ndim, *spatial')`` in voxels:
        the full-resolution displacement and the field the Grad penalty acts on (the displacement
        itself when ``int_steps == 0``, else the velocity at ``1 / int_downsize`` resolution).
        """

        def __init__(self, *, ndim, inshape, int_steps, int_downsize, nb_features, activation, upsample_mode):
            super().__init__()
            self.ndim = int(ndim)
            self.config = {
                "ndim": int(ndim), "inshape": [int(n) for n in inshape], "int_steps": int(int_steps),
                "int_downsize": int(int_downsize), "nb_features": [[int(f) for f in level] for level in nb_features],
                "activation": str(activation), "upsample_mode": str(upsample_mode),
            }
            act = LeakyReLU02 if activation == "leaky_relu_0.2" else activation
            self.net = vxm.nn.models.VxmPairwise(
                ndim=self.ndim, source_channels=1, target_channels=1,
                nb_features=self.config["nb_features"], activations=act,
                integration_steps=0, unet_kwargs={"upsample_mode": upsample_mode})
            self.transformer = vxm.nn.modules.SpatialTransformer()
            self.int_steps = int(int_steps)
            self.downsize = int(int_downsize) if int_steps > 0 else 1
            self.integrate = vxm.nn.modules.IntegrateVelocityField(steps=int_steps) if int_steps > 0 else None
            if self.downsize > 1:
                self.resize_down = vxm.nn.modules.ResizeDisplacementField(scale_factor=1.0 / self.downsize)
                self.resize_up = vxm.nn.modules.ResizeDisplacementField(scale_factor=float(self.downsize))
            else:
                self.resize_down = self.resize_up = None
            self.history = []

        def forward(self, moving, fixed):
            flow = self.net(moving, fixed)  # source = moving, target = fixed: [moving, fixed] input
            if self.integrate is None:
                return flow, flow
            preint = self.resize_down(flow) if self.resize_down is not None else flow
            disp = self.integrate(preint)
            if self.resize_up is not None:
                disp = self.resize_up(disp)
            return disp, preint

    return torch, vxm, VxmDensePeer


def _levels(nb_features) -> int:
    return len(nb_features[0])


def _check_inshape(inshape, nb_features) -> tuple[int, ...]:
    inshape = tuple(int(n) for n in inshape)
    if len(inshape) not in (2, 3):
        raise ValueError(f"inshape must have 2 or 3 spatial axes, got {inshape}")
    multiple = 2 ** _levels(nb_features)
    if any(n % multiple for n in inshape):
        raise ValueError(f"inshape {inshape} must be divisible by {multiple} on every axis "
                         f"({_levels(nb_features)} pooling levels)")
    return inshape


def build_vxmdense(*, inshape: Sequence[int], int_steps: int = 0, int_downsize: int = 2,
                   nb_features: Sequence[Sequence[int]] = CLASSIC_FEATURES, activation: str = "leaky_relu_0.2",
                   upsample_mode: str = "nearest", seed: int = 0):
    """An untrained peer model (what :func:`train_vxmdense` starts from).

    Args:
        inshape: training spatial shape, 2 or 3 axes, each divisible by ``2 ** len(nb_features[0])``.
        int_steps: scaling-and-squaring steps; 0 = plain VoxelMorph (displacement output).
        int_downsize: integration at ``1 / int_downsize`` resolution when ``int_steps > 0``.
        nb_features: ``[[encoder], [decoder]]`` widths of ``neurite.nn.models.BasicUNet``.
        activation: ``"leaky_relu_0.2"`` (classic) or any ``neurite`` activation name (``"relu"``).
        upsample_mode: ``"nearest"`` (classic), ``"linear"`` (0.3.4 default) or ``"transposed"``.
        seed: ``torch.manual_seed`` before the weights are drawn.

    Returns:
        ``torch.nn.Module`` with ``config`` (JSON-able dict), ``ndim``, ``net`` (the ``VxmPairwise``),
        ``transformer`` (``SpatialTransformer``) and ``history`` (training log, empty).

    Raises:
        ValueError: on a bad shape or option.
    """
    nb_features = [list(level) for level in nb_features]
    if len(nb_features) != 2:
        raise ValueError(f"nb_features must be [[encoder], [decoder]], got {nb_features}")
    inshape = _check_inshape(inshape, nb_features)
    if int(int_steps) != int_steps or int_steps < 0:
        raise ValueError(f"int_steps must be a non-negative integer, got {int_steps!r}")
    if int(int_downsize) != int_downsize or int_downsize < 1:
        raise ValueError(f"int_downsize must be a positive integer, got {int_downsize!r}")
    if int_steps > 0 and any(n % int_downsize for n in inshape):
        raise ValueError(f"inshape {inshape} must be divisible by int_downsize={int_downsize}")
    if upsample_mode not in ("nearest", "linear", "transposed"):
        raise ValueError(f"upsample_mode must be 'nearest', 'linear' or 'transposed', got {upsample_mode!r}")
    torch, _, VxmDensePeer = _classes()
    torch.manual_seed(int(seed))
    return VxmDensePeer(ndim=len(inshape), inshape=inshape, int_steps=int(int_steps),
                        int_downsize=int(int_downsize), nb_features=nb_features, activation=activation,
                        upsample_mode=upsample_mode)


def _batch_tensors(torch, batch, inshape, step):
    if not isinstance(batch, Mapping) or "fixed" not in batch or "moving" not in batch:
        raise TypeError(f"batch {step} must be a mapping with 'fixed' and 'moving' arrays, got {type(batch).__name__}")
    out = []
    for key in ("fixed", "moving"):
        a = np.asarray(batch[key], dtype=np.float32)
        if a.ndim != len(inshape) + 1 or tuple(a.shape[1:]) != tuple(inshape):
            raise ValueError(f"batch {step}: {key!r} must have shape (B, *{tuple(inshape)}), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"batch {step}: {key!r} has non-finite values")
        out.append(torch.from_numpy(np.ascontiguousarray(a))[:, None])
    if out[0].shape != out[1].shape:
        raise ValueError(f"batch {step}: fixed {tuple(out[0].shape)} and moving {tuple(out[1].shape)} differ")
    return out


def _objective(loss, image_sigma):
    import neurite as ne

    if loss == "mse":
        mse = ne.nn.modules.MSE()
        scale = 1.0 / float(image_sigma) ** 2
        return lambda fixed, warped: mse(warped, fixed) * scale
    if loss == "ncc":
        ncc = ne.nn.modules.NCC(window_size=NCC_WINDOW)
        return lambda fixed, warped: -ncc(fixed, warped).mean()
    raise ValueError(f"loss must be 'mse' or 'ncc', got {loss!r}")


def train_vxmdense(batches: Iterator[Mapping[str, np.ndarray]], *, inshape: Sequence[int], steps: int,
                   learning_rate: float = 1e-3, loss: str = "mse", image_sigma: float = 1.0,
                   reg_weight: float = 0.01, int_steps: int = 0, int_downsize: int = 2, seed: int = 0,
                   log_every: int | None = 50, num_threads: int = 2,
                   nb_features: Sequence[Sequence[int]] = CLASSIC_FEATURES, activation: str = "leaky_relu_0.2",
                   upsample_mode: str = "nearest"):
    """Train a VoxelMorph 0.3.4 peer on the given batches (unsupervised, one batch per Adam step).

    Args:
        batches: iterator of ``{"fixed": (B, *inshape), "moving": (B, *inshape)}`` float32 arrays
            in [0, 1] (numpy or anything ``np.asarray`` takes); ``steps`` of them are consumed.
        inshape: spatial shape (2 or 3 axes), divisible by 16 on every axis.
        steps: Adam steps (0 returns the initialised model).
        learning_rate: Adam learning rate (VoxelMorph default 1e-4 in ``train.py``; 1e-3 here by request).
        loss: ``"mse"`` (``MSE / image_sigma**2``) or ``"ncc"`` (minus squared local NCC, window 9).
        image_sigma: image noise standard deviation for the MSE term (intensity units); ignored for NCC.
        reg_weight: weight of ``Grad('l2')`` (VoxelMorph's lambda: 0.01 for MSE, ~1 for NCC in the paper).
        int_steps: 0 = plain VoxelMorph; 7 = VoxelMorph's diffeomorphic variant.
        int_downsize: integration resolution divisor when ``int_steps > 0``.
        seed: ``torch.manual_seed`` (weight initialisation).
        log_every: print a line every this many steps (and at the last); None or 0 prints nothing.
        num_threads: ``torch.set_num_threads``.
        nb_features, activation, upsample_mode: network options, see :func:`build_vxmdense`.

    Returns:
        The trained model in eval mode; ``model.history`` is a list of
        ``{"step", "loss", "similarity", "regularization", "seconds"}`` per step, ``model.train_info``
        a dict of the training options, total seconds and the package versions.

    Raises:
        ValueError: on bad shapes/options, or when ``batches`` ends before ``steps`` batches.
        TypeError: when a batch is not a mapping with ``fixed``/``moving``.
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if image_sigma <= 0:
        raise ValueError(f"image_sigma must be positive, got {image_sigma}")
    if reg_weight < 0:
        raise ValueError(f"reg_weight must be non-negative, got {reg_weight}")
    similarity = _objective(loss, image_sigma)
    import neurite as ne

    torch, _, _ = _classes()
    torch.set_num_threads(int(num_threads))
    model = build_vxmdense(inshape=inshape, int_steps=int_steps, int_downsize=int_downsize,
                           nb_features=nb_features, activation=activation, upsample_mode=upsample_mode, seed=seed)
    inshape = tuple(model.config["inshape"])
    grad = ne.nn.modules.SpatialGradient(penalty="l2")
    loss_mult = float(model.downsize)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(learning_rate))
    model.train()
    start = time.perf_counter()
    iterator = iter(batches)
    for step in range(int(steps)):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"batches ended after {step} batches, {steps} steps requested") from None
        fixed, moving = _batch_tensors(torch, batch, inshape, step)
        disp, preint = model(moving, fixed)
        warped = model.transformer(moving, disp)
        sim = similarity(fixed, warped)
        reg = grad(preint) * loss_mult
        total = sim + float(reg_weight) * reg
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        record = {"step": step, "loss": float(total.detach()), "similarity": float(sim.detach()),
                  "regularization": float(reg.detach()), "seconds": time.perf_counter() - start}
        if not np.isfinite(record["loss"]):
            raise FloatingPointError(f"VoxelMorph peer loss is not finite at step {step}: {record}")
        model.history.append(record)
        if log_every and (step % int(log_every) == 0 or step == steps - 1):
            print(f"[vxm peer] step {step:6d}  loss {record['loss']:.6f}  sim {record['similarity']:.6f}  "
                  f"reg {record['regularization']:.6f}  {record['seconds']:.1f}s", flush=True)
    model.eval()
    model.train_info = {"steps": int(steps), "learning_rate": float(learning_rate), "loss": loss,
                        "image_sigma": float(image_sigma), "reg_weight": float(reg_weight), "seed": int(seed),
                        "num_threads": int(num_threads), "seconds": time.perf_counter() - start,
                        "parameters": parameter_count(model), "versions": versions(), **model.config}
    return model


def _pad_amount(shape, multiple):
    return [(-n) % multiple for n in shape]


def predict(model, fixed: np.ndarray, moving: np.ndarray, *, num_threads: int | None = 2) -> np.ndarray:
    """Displacement from ``moving`` to ``fixed`` in ppreg's convention.

    Args:
        model: a model from :func:`train_vxmdense` / :func:`build_vxmdense` / :func:`load_model`.
        fixed: float32 ``(*spatial)`` or a batch ``(B, *spatial)``, intensities in [0, 1].
        moving: same shape as ``fixed``.
        num_threads: ``torch.set_num_threads`` (None leaves it).

    Returns:
        float32 ``(*spatial, ndim)`` (or ``(B, *spatial, ndim)``) channel-last, in voxels,
        component k along array axis k, such that ``ppreg.warp.warp_displacement(moving, u)``
        ~ ``fixed`` (pull-back ``warped(x) = moving(x + u(x))``). A spatial shape that is not a
        multiple of ``2 ** levels`` is zero-padded at the high end for the network and cropped back.

    Raises:
        ValueError: if the shapes differ or have the wrong number of axes.
    """
    torch, _, _ = _classes()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must have the same shape")
    ndim = model.ndim
    if fixed.ndim == ndim:
        batched = False
        fixed, moving = fixed[None], moving[None]
    elif fixed.ndim == ndim + 1:
        batched = True
    else:
        raise ValueError(f"expected (*spatial) or (B, *spatial) with {ndim} spatial axes, got {fixed.shape}")
    spatial = fixed.shape[1:]
    multiple = 2 ** _levels(model.config["nb_features"]) * max(1, model.downsize)
    pad = _pad_amount(spatial, multiple)
    if any(pad):
        widths = [(0, 0)] + [(0, p) for p in pad]
        fixed, moving = np.pad(fixed, widths), np.pad(moving, widths)
    f = torch.from_numpy(np.ascontiguousarray(fixed))[:, None]
    m = torch.from_numpy(np.ascontiguousarray(moving))[:, None]
    with torch.inference_mode():
        disp, _ = model(m, f)
    u = disp.numpy()[(slice(None), slice(None)) + tuple(slice(0, n) for n in spatial)]
    u = np.ascontiguousarray(np.moveaxis(u, 1, -1), dtype=np.float32)
    return u if batched else u[0]


def warp(model, moving: np.ndarray, u: np.ndarray) -> np.ndarray:
    """VoxelMorph's own ``SpatialTransformer`` applied to a channel-last displacement.

    Args:
        model: a peer model (its ``transformer`` is used).
        moving: float32 ``(*spatial)``.
        u: float32 ``(*spatial, ndim)`` in ppreg's convention.

    Returns:
        float32 ``(*spatial)``: ``moving(x + u(x))`` (linear, zero outside ``[0, n - 1]``).
    """
    torch, _, _ = _classes()
    moving = np.asarray(moving, np.float32)
    u = np.asarray(u, np.float32)
    if u.shape != moving.shape + (moving.ndim,):
        raise ValueError(f"u must have shape {moving.shape + (moving.ndim,)}, got {u.shape}")
    flow = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u, -1, 0)))[None]
    with torch.inference_mode():
        out = model.transformer(torch.from_numpy(np.ascontiguousarray(moving))[None, None], flow)
    return out.numpy()[0, 0]


def time_inference(model, fixed: np.ndarray, moving: np.ndarray, repeats: int = 5, *, batch_size: int = 1,
                   num_threads: int = 2) -> float:
    """Wall time of :func:`predict` per pair on CPU, after one warm-up call.

    Args:
        model: a peer model.
        fixed, moving: one pair, float32 ``(*spatial)``.
        repeats: timed calls (the median is reported).
        batch_size: pairs per call (the pair tiled); the time is divided by it.
        num_threads: ``torch.set_num_threads``.

    Returns:
        Median seconds per pair (numpy -> torch, network, integration, torch -> numpy).

    Raises:
        ValueError: if ``repeats`` or ``batch_size`` < 1.
    """
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    if batch_size > 1:
        fixed = np.repeat(fixed[None], batch_size, axis=0)
        moving = np.repeat(moving[None], batch_size, axis=0)
    predict(model, fixed, moving, num_threads=num_threads)
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        predict(model, fixed, moving, num_threads=num_threads)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch_size


def parameter_count(model) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def save_model(path: str, model) -> None:
    """Save ``config``, weights and training log with ``torch.save`` (one file)."""
    torch, _, _ = _classes()
    torch.save({"format": _CHECKPOINT_FORMAT, "config": model.config, "state_dict": model.state_dict(),
                "history": list(model.history), "train_info": getattr(model, "train_info", None)}, path)


def load_model(path: str):
    """Load a model written by :func:`save_model` (``torch.load(weights_only=True)``).

    Raises:
        ValueError: if the file is not a VoxelMorph peer checkpoint.
    """
    torch, _, _ = _classes()
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {_CHECKPOINT_FORMAT} file")
    cfg = payload["config"]
    model = build_vxmdense(inshape=cfg["inshape"], int_steps=cfg["int_steps"], int_downsize=cfg["int_downsize"],
                           nb_features=cfg["nb_features"], activation=cfg["activation"],
                           upsample_mode=cfg["upsample_mode"])
    model.load_state_dict(payload["state_dict"])
    model.history = list(payload.get("history") or [])
    if payload.get("train_info") is not None:
        model.train_info = payload["train_info"]
    model.eval()
    return model


def _smooth_displacement(rng, shape, *, sigma, amplitude, margin):
    """Smooth random displacement (numpy), different per component, vanishing ``margin`` voxels from the border."""
    from scipy.ndimage import gaussian_filter

    comps = []
    for k in range(len(shape)):
        c = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
        comps.append(c / np.abs(c).max() * amplitude[k])
    u = np.stack(comps, axis=-1)
    window = np.ones(shape)
    for axis, n in enumerate(shape):
        x = np.arange(n, dtype=np.float64)
        ramp = np.clip(np.minimum(x - margin, n - 1 - margin - x) / margin, 0.0, 1.0)
        window = window * ramp.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    return (u * window[..., None]).astype(np.float32)


def _smooth_image(rng, shape, sigma=3.0):
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def check_convention(shape: Sequence[int] = (64, 64), *, seed: int = 0, model=None) -> dict:
    """Compare VoxelMorph's ``SpatialTransformer`` with ``ppreg.warp.warp_displacement``.

    A smooth random displacement ``u`` (different amplitude per axis, vanishing near the border so
    every sample lies in ``[0, n - 1]``) warps a smooth random image with both; then a pure
    translation along axis 0 tests the axis order (the same flow with its channels swapped must
    disagree), and an unwindowed field shows the border rule difference.

    Args:
        shape: spatial shape (2 or 3 axes, >= 16 each).
        seed: numpy seed.
        model: a peer model whose transformer to use (default: a fresh ``SpatialTransformer``).

    Returns:
        dict with ``max_abs_diff`` (windowed ``u``, interior samples), ``translation_max_abs_diff``,
        ``swapped_axes_max_abs_diff`` (must be large), ``unwindowed_interior_max_abs_diff`` and
        ``unwindowed_border_max_abs_diff`` (samples within half a voxel outside ``[0, n - 1]``).
    """
    import jax.numpy as jnp

    from ppreg.warp import warp_displacement

    torch, vxm, _ = _classes()
    transformer = model.transformer if model is not None else vxm.nn.modules.SpatialTransformer()
    shape = tuple(int(n) for n in shape)
    rng = np.random.default_rng(seed)
    moving = _smooth_image(rng, shape)

    def vxm_warp(u):
        flow = torch.from_numpy(np.ascontiguousarray(np.moveaxis(u, -1, 0)))[None]
        with torch.inference_mode():
            return transformer(torch.from_numpy(moving)[None, None], flow).numpy()[0, 0]

    def ppreg_warp(u):
        return np.asarray(warp_displacement(jnp.asarray(moving), jnp.asarray(u)))

    amplitude = [3.0 + 1.5 * k for k in range(len(shape))]
    u = _smooth_displacement(rng, shape, sigma=6.0, amplitude=amplitude, margin=max(8.0, 2 * max(amplitude)))
    diff = float(np.abs(vxm_warp(u) - ppreg_warp(u)).max())

    t = np.zeros(shape + (len(shape),), np.float32)
    t[..., 0] = 2.5
    inner = tuple(slice(0, n - 3) for n in shape)  # samples x + 2.5 stay inside for x_0 <= n - 4
    trans = float(np.abs(vxm_warp(t)[inner] - ppreg_warp(t)[inner]).max())
    swapped = float(np.abs(vxm_warp(t[..., ::-1].copy())[inner] - ppreg_warp(t)[inner]).max())

    big = _smooth_displacement(rng, shape, sigma=6.0, amplitude=amplitude, margin=1e-6)
    big = big + np.float32(0.3)  # push samples across the high border on every axis
    coords = np.stack(np.indices(shape), axis=-1) + big
    hi = np.asarray(shape, np.float32) - 1
    interior = np.all((coords >= 0) & (coords <= hi), axis=-1)
    rim = np.all((coords >= -0.5) & (coords <= hi + 0.5), axis=-1) & ~interior
    d_all = np.abs(vxm_warp(big) - ppreg_warp(big))
    return {"shape": list(shape), "max_abs_diff": diff, "translation_max_abs_diff": trans,
            "swapped_axes_max_abs_diff": swapped,
            "unwindowed_interior_max_abs_diff": float(d_all[interior].max()),
            "unwindowed_border_max_abs_diff": float(d_all[rim].max()) if rim.any() else 0.0,
            "border_voxels": int(rim.sum())}


def _random_batches(shape, batch_size, seed):
    """Endless numpy batches: smooth random images and the same images pulled back by smooth random fields."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float64)
    while True:
        fixed, moving = [], []
        for _ in range(batch_size):
            img = _smooth_image(rng, shape)
            u = _smooth_displacement(rng, shape, sigma=8.0, amplitude=[4.0] * len(shape), margin=6.0)
            # moving(x + u(x)) = fixed(x) to first order: moving = fixed o (id - u)
            m = map_coordinates(img, [grid[k] - u[..., k] for k in range(len(shape))], order=1, mode="nearest")
            fixed.append(img)
            moving.append(m.astype(np.float32))
        yield {"fixed": np.stack(fixed), "moving": np.stack(moving)}


def _eval_loss(model, batch, reg_weight):
    """MSE + reg_weight * Grad of a model on one batch (no gradient)."""
    import neurite as ne

    torch, _, _ = _classes()
    fixed, moving = _batch_tensors(torch, batch, tuple(model.config["inshape"]), 0)
    with torch.inference_mode():
        disp, preint = model(moving, fixed)
        warped = model.transformer(moving, disp)
        sim = float(((warped - fixed) ** 2).mean())
        reg = float(ne.nn.modules.SpatialGradient(penalty="l2")(preint)) * model.downsize
    return sim + reg_weight * reg, sim


def _main() -> None:
    if not available():
        raise SystemExit("torch / voxelmorph>=0.3 / neurite are not installed (pip install -e '.[bench]')")
    import torch

    shape, steps, batch_size, reg_weight = (64, 64), 20, 4, 0.01
    print("versions:", versions(), "torch threads ->", 2)
    conv = check_convention(shape)
    print("convention check (VoxelMorph SpatialTransformer vs ppreg.warp.warp_displacement):")
    for k, v in conv.items():
        print(f"  {k}: {v}")
    conv3 = check_convention((16, 20, 24))
    print(f"  3D (16, 20, 24): max_abs_diff {conv3['max_abs_diff']:.3g}, "
          f"translation {conv3['translation_max_abs_diff']:.3g}, swapped {conv3['swapped_axes_max_abs_diff']:.3g}")

    import itertools

    import jax.numpy as jnp

    from ppreg.warp import warp_displacement

    train_batch = next(_random_batches(shape, batch_size, seed=1))
    held_out = next(_random_batches(shape, 8, seed=123))
    grid = np.stack(np.indices(shape), axis=-1)
    for int_steps in (0, 7):
        label = "plain VoxelMorph (int_steps=0)" if int_steps == 0 else "VoxelMorph-diff (int_steps=7)"
        # the optimiser works: 20 Adam steps (lr 1e-3) on one repeated batch lower its loss
        model = train_vxmdense(itertools.repeat(train_batch), inshape=shape, steps=steps, loss="mse",
                               reg_weight=reg_weight, int_steps=int_steps, log_every=5)
        first, last = model.history[0]["loss"], model.history[-1]["loss"]
        print(f"{label}: {parameter_count(model)} parameters, {steps} steps in {model.train_info['seconds']:.1f}s; "
              f"loss {first:.6f} -> {last:.6f} ({100 * (last - first) / first:+.1f}%)")
        f, m = held_out["fixed"][0], held_out["moving"][0]
        u = predict(model, f, m)
        own = warp(model, m, u)
        pp = np.asarray(warp_displacement(jnp.asarray(m), jnp.asarray(u)))
        inside = np.all((grid + u >= 0) & (grid + u <= np.asarray(shape) - 1), axis=-1)
        print(f"  predict: u {u.shape} {u.dtype}; ppreg warp vs VoxelMorph warp of predict()'s u: "
              f"max abs diff {np.abs(pp - own)[inside].max():.2e} (interior samples)")
        t1 = time_inference(model, f, m, repeats=5)
        t8 = time_inference(model, f, m, repeats=3, batch_size=8)
        print(f"  inference (CPU, 2 threads): {t1 * 1e3:.1f} ms/pair at batch 1, {t8 * 1e3:.1f} ms/pair at batch 8")

    # generalisation needs more steps (the flow head starts at N(0, 1e-5)): 150 steps on fresh batches
    init = build_vxmdense(inshape=shape, seed=0)
    before, _ = _eval_loss(init, held_out, reg_weight)
    model = train_vxmdense(_random_batches(shape, batch_size, seed=1), inshape=shape, steps=150,
                           reg_weight=reg_weight, log_every=0)
    after, _ = _eval_loss(model, held_out, reg_weight)
    print(f"plain VoxelMorph, 150 steps on fresh batches ({model.train_info['seconds']:.1f}s): "
          f"held-out loss {before:.6f} -> {after:.6f}")

if __name__ == "__main__":
    _main()
