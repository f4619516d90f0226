"""Checkpoints of learned models: a directory with a JSON config and safetensors weights.

A *checkpoint* is a directory holding

- ``config.json``: what is needed to rebuild the network before its weights are read::

      {"format": "ppreg-checkpoint", "format_version": 1,
       "architecture": "<registered name>", "kwargs": {...constructor arguments...},
       "training": {...free-form, JSON...} or null, "ppreg_version": "x.y.z",
       "weights_sha256": "<hex sha256 of weights.safetensors>",
       "tensors": {"<name>": [shape...], ...}}

- ``weights.safetensors``: every array leaf of the Equinox model (``eqx.filter(model,
  eqx.is_array)``) in the `safetensors <https://github.com/huggingface/safetensors>`_ format, named
  by ``jax.tree_util.keystr`` of its path in the module (e.g. ``.unet.encoder[0].weight``), dtype
  kept (float32 stays float32);
- optionally ``train_state.safetensors``: the optimiser state etc. needed to resume training, an
  arbitrary pytree of arrays written with the same naming (see :func:`save_tree`).

The architecture is a class registered with :func:`register_architecture`; loading builds a
skeleton ``cls(**kwargs, key=jax.random.key(0))`` (shapes only, via ``eqx.filter_eval_shape``)
and fills its array leaves from the file, after checking the sha256, the tensor names, shapes
and dtypes. Every problem is reported as a :class:`CheckpointError` naming it; nothing is
silently reinterpreted.

Writes are atomic: :func:`save` stages the files in a temporary directory beside ``path`` and
swaps it in only once complete, so a crash or an error never leaves a half-written checkpoint and
an existing checkpoint is kept until its replacement is whole. :func:`save_tree` writes its
single file through :func:`ppreg._atomic.atomic_write_bytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy as stnp
from safetensors import SafetensorError

from .. import __version__
from .._atomic import atomic_write_bytes

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "TRAIN_STATE_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "CheckpointError",
    "architectures",
    "load",
    "load_tree",
    "register_architecture",
    "save",
    "save_tree",
]

FORMAT = "ppreg-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
LOG_FILE = "log.json"
_TREE_FORMAT = "ppreg-tree"
_KNOWN_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, TRAIN_STATE_FILE, LOG_FILE})
_CONFIG_TYPES = {
    "format": str,
    "format_version": int,
    "architecture": str,
    "kwargs": dict,
    "training": (dict, type(None)),
    "ppreg_version": str,
    "weights_sha256": str,
    "tensors": dict,
}

_REGISTRY: dict[str, type] = {}


class CheckpointError(ValueError):
    """A checkpoint (or saved tree) is missing, corrupt, or does not match what it should hold."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: The rebuilt Equinox module with the saved weights (arrays on the default device).
        config: The parsed ``config.json`` (see the module docstring for its fields).
        path: The checkpoint directory it was read from.
    """

    model: Any
    config: dict
    path: Path


# ----------------------------------------------------------------------------------------------
# Architecture registry


def register_architecture(name: str) -> Callable[[type], type]:
    """Class decorator registering an Equinox module class under ``name`` for :func:`load`.

    The class must be constructible as ``cls(**kwargs, key=jax.random.key(0))`` from the
    JSON-able ``kwargs`` passed to :func:`save`, giving a module whose array leaves have the same
    names, shapes and dtypes as the saved model's.

    Args:
        name: Registry name stored in ``config.json`` (a non-empty string).

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        TypeError: ``name`` is not a non-empty string, or the decorated object is not an
            ``eqx.Module`` subclass.
        ValueError: ``name`` is already registered to a different class.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"architecture name must be a non-empty string, got {name!r}")

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, eqx.Module)):
            raise TypeError(f"register_architecture({name!r}) needs an eqx.Module subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        if known is not None and known is not cls and _qualname(known) != _qualname(cls):
            raise ValueError(f"architecture {name!r} is already registered to {_qualname(known)}")
        _REGISTRY[name] = cls  # same qualified name: a module reload replaces the old class
        return cls

    return decorator


def architectures() -> dict[str, type]:
    """The registered architectures.

    Returns:
        A copy of the registry, ``{name: class}``.
    """
    return dict(_REGISTRY)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _architecture(name: str, exc: type[Exception]) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise exc(f"unknown architecture {name!r}; registered architectures: {known}") from None


# ----------------------------------------------------------------------------------------------
# Pytrees of arrays <-> named tensors


def _is_array_like(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_prng_key(dtype) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _spec(leaf) -> tuple[tuple[int, ...], np.dtype | Any]:
    """(shape, dtype) of an array or ShapeDtypeStruct leaf."""
    return tuple(int(n) for n in leaf.shape), leaf.dtype


def _named_leaves(tree) -> tuple[list[tuple[str, Any]], Any, Any]:
    """Array leaves of ``tree`` with their keystr names, the treedef of the arrays, the static rest."""
    arrays, static = eqx.partition(tree, _is_array_like)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays)
    named = [(jax.tree_util.keystr(p), leaf) for p, leaf in flat]
    seen: set[str] = set()
    for name, _ in named:
        if name in seen:  # cannot happen for ordinary pytrees; refuse rather than overwrite
            raise TypeError(f"two array leaves share the name {name!r}")
        seen.add(name)
    return named, treedef, static


def _to_tensors(tree) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Host numpy copies of the array leaves, and ``{name: impl}`` for typed PRNG-key leaves."""
    named, _, _ = _named_leaves(tree)
    tensors: dict[str, np.ndarray] = {}
    keys: dict[str, str] = {}
    for name, leaf in named:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(f"leaf {name} is a jax.ShapeDtypeStruct, not an array: nothing to save")
        if _is_prng_key(leaf.dtype):
            keys[name] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(leaf, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        tensors[name] = arr
    return tensors, keys


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """``safetensors.numpy.save``, with an unsupported dtype reported as a TypeError naming the leaf."""
    try:
        return stnp.save(tensors, metadata=metadata)
    except (KeyError, ValueError, TypeError, SafetensorError) as exc:
        bad = []
        for name, arr in tensors.items():
            try:
                stnp.save({"x": np.zeros((0,), arr.dtype)})
            except Exception:  # noqa: BLE001 - whatever safetensors raises for this dtype
                bad.append(f"{name} ({arr.dtype})")
        what = ", ".join(bad) if bad else repr(exc)
        raise TypeError(f"cannot store these leaves in safetensors: {what}") from exc


def _fill(like, tensors: dict[str, np.ndarray], keys: dict[str, str], where: str):
    """``like`` with its array leaves replaced by ``tensors``, after checking names, shapes, dtypes."""
    named, treedef, static = _named_leaves(like)
    expected = [name for name, _ in named]
    missing = [n for n in expected if n not in tensors]
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        raise CheckpointError(f"{where}: tensors do not match the expected structure: {'; '.join(parts)}")
    leaves = []
    for name, leaf in named:
        shape, dtype = _spec(leaf)
        arr = tensors[name]
        if _is_prng_key(dtype):
            impl = str(jax.random.key_impl(leaf)) if eqx.is_array(leaf) else None
            saved_impl = keys.get(name)
            if saved_impl is None:
                raise CheckpointError(f"{where}: tensor {name} should be a PRNG key ({dtype}) but was saved as "
                                      f"plain {arr.dtype} data")
            if impl is not None and saved_impl != impl:
                raise CheckpointError(f"{where}: PRNG key {name} uses implementation {saved_impl!r}, "
                                      f"expected {impl!r}")
            key = jax.random.wrap_key_data(jnp.asarray(arr), impl=saved_impl)
            if key.shape != shape or key.dtype != dtype:
                raise CheckpointError(f"{where}: PRNG key {name} has shape {key.shape} ({key.dtype}), "
                                      f"expected {shape} ({dtype})")
            leaves.append(key)
            continue
        if name in keys:
            raise CheckpointError(f"{where}: tensor {name} was saved as a PRNG key but {dtype} data is expected")
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(arr.shape)}, expected {shape}")
        if np.dtype(arr.dtype) != np.dtype(dtype):
            raise CheckpointError(f"{where}: tensor {name} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        leaves.append(jnp.asarray(arr))
    arrays = jax.tree_util.tree_unflatten(treedef, leaves)
    return eqx.combine(arrays, static)


def _parse_safetensors(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and the ``__metadata__`` of a safetensors byte string; parse errors -> CheckpointError."""
    try:
        tensors = stnp.load(data)
        (n,) = np.frombuffer(data[:8], "<u8")
        header = json.loads(data[8:8 + int(n)])
    except (SafetensorError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{where} is truncated or not a safetensors file: {exc}") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{where}: safetensors metadata is not a mapping")
    return tensors, metadata


def _key_metadata(metadata: dict[str, str], where: str) -> dict[str, str]:
    raw = metadata.get("prng_keys", "{}")
    try:
        keys = json.loads(raw)
    except (TypeError, ValueError):
        keys = None
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise CheckpointError(f"{where}: malformed 'prng_keys' metadata {raw!r}")
    return keys


def _tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], order="C")
        h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Model checkpoints


def _json_roundtrip(value, what: str):
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable (finite numbers, str keys): {exc}") from None


def _skeleton(cls: type, kwargs: dict):
    """Shape-only instance ``cls(**kwargs, key=jax.random.key(0))`` (real instance if tracing fails)."""
    build = lambda: cls(**kwargs, key=jax.random.key(0))  # noqa: E731
    try:
        return eqx.filter_eval_shape(build)
    except Exception:  # noqa: BLE001 - e.g. a constructor needing concrete values; retry for real
        return build()


def _spec_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    named, _, _ = _named_leaves(tree)
    return {name: (_spec(leaf)[0], str(leaf.dtype)) for name, leaf in named}


def save(path: str | os.PathLike, model, *, architecture: str, kwargs: dict,
         training: dict | None = None, train_state=None, log: dict | None = None) -> None:
    """Write ``model`` as a checkpoint directory at ``path``, atomically.

    ``config.json`` and ``weights.safetensors`` (and ``train_state.safetensors`` when
    ``train_state`` is given) are staged in a temporary directory beside ``path`` and moved into
    place only when all are written. An existing checkpoint at ``path`` is replaced as a whole
    (a stale ``train_state.safetensors`` of the old one does not survive); if saving fails it is
    left untouched. Before writing, the model is checked against the skeleton that :func:`load`
    will build from ``architecture`` and ``kwargs``, so an unloadable checkpoint is never written.

    Args:
        path: Checkpoint directory. Its parent is created if needed. If it exists it must be a
            directory containing only checkpoint files (``config.json``, ``weights.safetensors``,
            ``train_state.safetensors``, ``log.json``), so that nothing else is ever deleted.
        model: The Equinox module to save; its array leaves (any dtype safetensors stores:
            float16/32/64, (u)int8..64, bool; typed PRNG keys are stored as their key data).
        architecture: Registered name of ``type(model)`` (see :func:`register_architecture`).
        kwargs: JSON-able constructor arguments: ``cls(**kwargs, key=...)`` must rebuild a module
            of the same structure. Tuples come back as lists.
        training: Optional JSON-able description of the training run (data, losses, steps...).
        train_state: Optional pytree of arrays (e.g. the optax state) to store alongside as
            ``train_state.safetensors`` in the same atomic write; read it back with
            ``load_tree(path / TRAIN_STATE_FILE, like)``.
        log: Optional JSON-able training log, written as ``log.json`` in the same atomic write.

    Raises:
        ValueError: ``architecture`` is not registered, or ``model`` is not an instance of that
            class or does not match the skeleton built from ``kwargs`` (the message names the
            differing tensors).
        TypeError: ``kwargs``/``training`` are not JSON-serialisable, or a leaf has a dtype
            safetensors cannot store.
        FileExistsError: ``path`` exists and is not a directory of checkpoint files.
        OSError: Writing failed; ``path`` is unchanged.
    """
    path = Path(path)
    cls = _architecture(architecture, ValueError)
    if not isinstance(model, cls):
        raise ValueError(f"model is a {type(model).__qualname__}, but architecture {architecture!r} "
                         f"is {_qualname(cls)}")
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    if training is not None and not isinstance(training, dict):
        raise TypeError(f"training must be a dict or None, got {type(training).__name__}")
    kwargs = _json_roundtrip(kwargs, "kwargs")
    training = None if training is None else _json_roundtrip(training, "training")

    try:
        expected = _spec_table(_skeleton(cls, kwargs))
    except Exception as exc:
        raise ValueError(f"cannot build architecture {architecture!r} from kwargs {kwargs}: {exc!r}") from exc
    actual = _spec_table(model)
    if expected != actual:
        diffs = [f"{n}: model {actual.get(n, 'absent')} vs kwargs {expected.get(n, 'absent')}"
                 for n in sorted(set(expected) | set(actual)) if expected.get(n) != actual.get(n)]
        raise ValueError(f"model does not match architecture {architecture!r} built from kwargs {kwargs}: "
                         + "; ".join(diffs[:8]) + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else ""))

    tensors, keys = _to_tensors(model)
    weights = _safetensors_bytes(tensors, {"format": FORMAT, "prng_keys": json.dumps(keys, sort_keys=True)})
    state_bytes = None if train_state is None else _tree_bytes(train_state)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "kwargs": kwargs,
        "training": training,
        "ppreg_version": __version__,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "tensors": {name: list(arr.shape) for name, arr in tensors.items()},
    }
    config_text = json.dumps(config, indent=2) + "\n"

    _check_replaceable(path)
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    stage.mkdir()  # mode 0o777 minus umask, like any new directory
    try:
        atomic_write_bytes(stage / WEIGHTS_FILE, weights)
        if state_bytes is not None:
            atomic_write_bytes(stage / TRAIN_STATE_FILE, state_bytes)
        if log is not None:
            atomic_write_bytes(stage / LOG_FILE, (json.dumps(log) + "\n").encode("utf-8"))
        atomic_write_bytes(stage / CONFIG_FILE, config_text.encode("utf-8"))
        _swap_in(stage, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_replaceable(path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a checkpoint directory; refusing to replace it")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _KNOWN_FILES)
    if foreign:
        raise FileExistsError(f"{path} holds files that are not part of a checkpoint ({', '.join(foreign)}); "
                              "refusing to replace it")


def _swap_in(stage: Path, path: Path) -> None:
    """Move the complete ``stage`` directory to ``path``, replacing an existing checkpoint there.

    The old directory is first renamed aside and deleted only after the new one is in place; if
    the second rename fails the old one is renamed back.
    """
    parent = stage.parent
    if path.exists():
        _check_replaceable(path)
        old = parent / f".{path.name}.{uuid.uuid4().hex}.old"
        os.replace(path, old)
        try:
            os.replace(stage, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, path)
    _fsync_dir(parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    missing = [k for k in _CONFIG_TYPES if k not in config]
    if missing:
        raise CheckpointError(f"{cfg_path} lacks the keys {missing}")
    for key, types in _CONFIG_TYPES.items():
        value = config[key]
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            raise CheckpointError(f"{cfg_path}: {key!r} has the wrong type {type(value).__name__}")
    if config["format"] != FORMAT:
        raise CheckpointError(f"{cfg_path}: format is {config['format']!r}, expected {FORMAT!r}")
    if config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {config['format_version']} is not supported "
                              f"(this ppreg reads version {FORMAT_VERSION})")
    if not re.fullmatch(r"[0-9a-f]{64}", config["weights_sha256"]):
        raise CheckpointError(f"{cfg_path}: weights_sha256 is not a hex sha256 digest")
    for name, shape in config["tensors"].items():
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                for n in shape)):
            raise CheckpointError(f"{cfg_path}: tensor {name!r} has a malformed shape {shape!r}")
    return config


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save`.

    Args:
        path: The checkpoint directory.

    Returns:
        A :class:`Checkpoint` with the rebuilt model (arrays as saved, e.g. float32), the parsed
        config and the path.

    Raises:
        CheckpointError: (a ``ValueError``) the directory, ``config.json`` or
            ``weights.safetensors`` is missing; the config is not valid JSON or lacks/mistypes a
            field; the format or version is unknown; the architecture is not registered (the
            message lists the registered ones) or cannot be built from its kwargs; the weights'
            sha256 differs from the recorded one (corrupt file); the weights file is truncated or
            unparsable; or its tensors are missing, unexpected, or differ in shape or dtype from
            the skeleton or from the config's ``tensors`` table.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    config = _read_config(path)
    cls = _architecture(config["architecture"], CheckpointError)

    weights_path = path / WEIGHTS_FILE
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint: {WEIGHTS_FILE} is missing") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != config["weights_sha256"]:
        raise CheckpointError(f"{weights_path} is corrupt: its sha256 is {digest}, but {CONFIG_FILE} "
                              f"records {config['weights_sha256']}")
    tensors, metadata = _parse_safetensors(data, str(weights_path))
    keys = _key_metadata(metadata, str(weights_path))

    table = {name: list(arr.shape) for name, arr in tensors.items()}
    if table != config["tensors"]:
        raise CheckpointError(f"{weights_path} does not match the 'tensors' table of {CONFIG_FILE}")

    try:
        skeleton = _skeleton(cls, config["kwargs"])
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot build architecture {config['architecture']!r} from kwargs "
                              f"{config['kwargs']}: {exc!r}") from exc
    model = _fill(skeleton, tensors, keys, str(weights_path))
    return Checkpoint(model=model, config=config, path=path)


# ----------------------------------------------------------------------------------------------
# Arbitrary pytrees (optimiser state)


def _tree_bytes(tree) -> bytes:
    tensors, keys = _to_tensors(tree)
    metadata = {
        "format": _TREE_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "prng_keys": json.dumps(keys, sort_keys=True),
        "sha256": _tensors_digest(tensors),
        "ppreg_version": __version__,
    }
    return _safetensors_bytes(tensors, metadata)


def save_tree(path: str | os.PathLike, tree) -> None:
    """Write the array leaves of a pytree (e.g. an optax state) to one safetensors file, atomically.

    Leaves are named by ``jax.tree_util.keystr`` of their paths; non-array leaves (Python
    scalars, ``None``, static fields) are not stored and come back from ``like`` in
    :func:`load_tree`. 0-d arrays (step counts) and typed PRNG keys are supported. A sha256 of the
    tensors is kept in the file's metadata and verified on load.

    Args:
        path: Destination file (conventionally ``*.safetensors``); its parent is created if needed.
        tree: Pytree whose array leaves are saved with their dtypes.

    Raises:
        TypeError: A leaf has a dtype safetensors cannot store, or is a ``jax.ShapeDtypeStruct``.
        OSError: Writing failed; an existing file at ``path`` is unchanged.
    """
    path = Path(path)
    data = _tree_bytes(tree)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def load_tree(path: str | os.PathLike, like):
    """Read a pytree written by :func:`save_tree`, with the structure of ``like``.

    Args:
        path: File written by :func:`save_tree`.
        like: A pytree of the expected structure: its array leaves (arrays or
            ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape(optimizer.init, params)``) give
            the names, shapes and dtypes to expect; its non-array leaves are returned as they are.

    Returns:
        ``like`` with every array leaf replaced by the saved array (a ``jax.Array``).

    Raises:
        CheckpointError: (a ``ValueError``) the file is missing, truncated, not a ppreg tree, or
            its content digest does not match (corrupt); or its tensors are missing, unexpected,
            or differ in shape or dtype from ``like``'s leaves.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"no saved tree at {path}") from None
    tensors, metadata = _parse_safetensors(data, str(path))
    if metadata.get("format") != _TREE_FORMAT:
        raise CheckpointError(f"{path} is not a ppreg tree file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: format_version {metadata.get('format_version')!r} is not supported")
    digest = _tensors_digest(tensors)
    if metadata.get("sha256") != digest:
        raise CheckpointError(f"{path} is corrupt: the sha256 of its tensors is {digest}, "
                              f"the file records {metadata.get('sha256')}")
    keys = _key_metadata(metadata, str(path))
    return _fill(like, tensors, keys, str(path))
