"""Training recipe of VoxelMorph-diff: a bank of brains, synthetic pairs drawn on the device, Eq. 6.

Used by ``scripts/train_vxm_diff.py`` (the shipped models) and by ``ppreg train vxm-diff`` (a
user's own NIfTI files), so both train the same way: every step draws pairs with
:func:`ppreg.learned.synth.make_training_pair` (random diffeomorphisms of real brains, intensity
augmentation, optionally label-synthesised contrasts), optionally a random crop (3D: a fully
convolutional network trains on crops and registers whole volumes), and minimises
:func:`ppreg.learned.vxm.loss` with :func:`ppreg.learned.train.train`.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..image import load
from ..options import VXM_TRAIN_LOSS
from . import checkpoint
from .data import center_crop_or_pad, normalize_intensity
from .synth import crop_starts, make_training_pair
from .train import TrainResult, train
from .vxm import LossConfig, VxmDiff, loss

ARCHITECTURE = "VxmDiff"
MODEL_KWARGS = {  # default widths: 2D as VoxelMorph; 3D halved to meet 1.5 s per 2 mm volume on 2 CPU cores
    2: {"ndim": 2, "encoder_features": [16, 32, 32, 32, 32], "decoder_features": [32, 32, 32, 32]},
    3: {"ndim": 3, "encoder_features": [8, 16, 16, 16, 16], "decoder_features": [16, 16, 16, 16]},
}
DEFAULT_LOSS = LossConfig(**VXM_TRAIN_LOSS)


def random_crop(key, pair: dict, crop: tuple[int, ...], multiple: int = 16) -> dict:
    """The same random crop of every array of a pair, at an offset that is a multiple of ``multiple``.

    Args:
        key: PRNG key.
        pair: dict of arrays ``(*spatial)`` (images and label maps).
        crop: static crop shape, each size <= the spatial size.
        multiple: offsets are drawn from multiples of this (keeps the network's grid phase).

    Returns:
        dict of arrays ``crop``.

    Raises:
        ValueError: a crop larger than the image.
    """
    starts = crop_starts(key, next(iter(pair.values())).shape, tuple(crop), multiple)
    return {name: jax.lax.dynamic_slice(x, tuple(starts), crop) for name, x in pair.items()}


def sample_pair(key, bank: dict, *, crop: tuple[int, ...] | None = None, **pair_options) -> dict:
    """:func:`make_training_pair` on a random ``crop`` (warped and augmented on the crop only), or
    on the whole grid when ``crop`` is None."""
    # split(key)[0]: the key the whole-grid pair was always drawn with, so uncropped runs draw the same pairs
    return make_training_pair(jax.random.split(key)[0], bank, crop=None if crop is None else tuple(crop),
                              **pair_options)


def pair_loss(model, key, pair: dict, *, config: LossConfig):
    """:func:`ppreg.learned.vxm.loss` on a pair dict (labels passed for the surface term)."""
    return loss(model, key, pair["fixed"], pair["moving"], config, pair["fixed_labels"], pair["moving_labels"])


def _pairs_history(out: Path, pair_options: dict) -> dict:
    """``{"pairs_history": [...]}`` when a resumed run changes the pair options, else ``{}``.

    Each entry is ``{"from_step", "pairs"}``: the options the saved steps were drawn with, then the
    new ones from the saved step count on, so that the checkpoint says how every step was trained.
    """
    if not (out / checkpoint.TRAIN_STATE_FILE).exists():
        return {}
    try:
        saved = json.loads((out / checkpoint.CONFIG_FILE).read_text())["training"]
    except (OSError, ValueError, KeyError):
        return {}  # train() refuses the folder with a clear error
    pair_options = json.loads(json.dumps(pair_options))  # tuples as the JSON lists they are saved as
    history = saved.get("pairs_history") or [{"from_step": 0, "pairs": saved.get("pairs", {})}]
    if history[-1]["pairs"] == pair_options:
        return {"pairs_history": history} if len(history) > 1 else {}
    return {"pairs_history": [*history, {"from_step": int(saved.get("steps_done", 0)), "pairs": pair_options}]}


def train_vxm_diff(bank: dict, *, ndim: int, steps: int, batch_size: int, seed: int = 0, out=None,
                   loss_config: LossConfig = DEFAULT_LOSS, model_kwargs: dict | None = None,
                   pair_options: dict | None = None, crop: tuple[int, ...] | None = None,
                   learning_rate: float = 1e-3, lr_drops: dict | None = None, checkpoint_every: int = 100,
                   data: str = "", progress: bool = True, resume: bool = True) -> TrainResult:
    """Train a VoxelMorph-diff network on pairs synthesised from ``bank``.

    Args:
        bank: ``{"images": float32 (S, N, *spatial) in [0, 1], "labels": int32 (S, N, *spatial)}``
            (:func:`ppreg.learned.data.slice_bank`, :func:`bank_from_files`).
        ndim: 2 or 3.
        steps, batch_size: optimiser steps and pairs per step.
        seed: fixes the initial weights, the pairs and the samples.
        out: checkpoint folder (written every ``checkpoint_every`` steps; resumed when present).
        loss_config: :class:`ppreg.learned.vxm.LossConfig`.
        model_kwargs: :class:`VxmDiff` constructor kwargs (default :data:`MODEL_KWARGS`).
        pair_options: keyword options of :func:`make_training_pair`.
        crop: train on random crops of this shape (sizes multiples of 16), or ``None``.
        learning_rate: Adam step.
        lr_drops: ``{step: factor}`` rate drops (:func:`ppreg.learned.train.adam`).
        checkpoint_every: steps per jitted chunk.
        data: a description of the training data, stored in the checkpoint.
        progress, resume: see :func:`ppreg.learned.train.train`.

    Returns:
        :class:`ppreg.learned.train.TrainResult`.

    Raises:
        ValueError: bank shapes that do not match ``ndim`` or the network's size divisor.
    """
    kwargs = dict(MODEL_KWARGS[ndim] if model_kwargs is None else model_kwargs)
    images = np.shape(bank["images"])
    if len(images) != ndim + 2:
        raise ValueError(f"a {ndim}D bank must be (subjects, items, *spatial), got images of shape {images}")
    key_model, key_train = jax.random.split(jax.random.key(seed))
    model = VxmDiff(**kwargs, key=key_model)
    spatial = tuple(crop) if crop is not None else images[2:]
    if any(n % model.multiple for n in spatial):
        raise ValueError(f"training shape {spatial} must be divisible by {model.multiple}")
    pair_options = dict(pair_options or {})
    training = {"data": data, "seed": seed, "loss": dataclasses.asdict(loss_config), "pairs": pair_options,
                "crop": None if crop is None else list(crop), "bank_shape": list(images),
                "script": "ppreg.learned.recipes.train_vxm_diff"}
    if out is not None and resume:
        training.update(_pairs_history(Path(out), pair_options))
    bank = {"images": jnp.asarray(bank["images"], jnp.float32), "labels": jnp.asarray(bank["labels"], jnp.int32)}
    return train(model, partial(sample_pair, crop=None if crop is None else tuple(crop), **pair_options),
                 partial(pair_loss, config=loss_config), bank, steps=steps, batch_size=batch_size, key=key_train,
                 learning_rate=learning_rate, lr_drops=lr_drops, out=out, checkpoint_every=checkpoint_every,
                 architecture=ARCHITECTURE, kwargs=kwargs, training=training, resume=resume, progress=progress)


def bank_from_files(images: list, labels: list | None = None, *, multiple: int = 16) -> dict:
    """A training bank from a user's NIfTI files: one subject per file, one item each.

    Every image is scaled into [0, 1] (:func:`normalize_intensity`) and cropped or zero-padded
    centrally to the smallest common shape divisible by ``multiple`` that holds the largest image.

    Args:
        images: paths of 2D or 3D NIfTI images (at least 2, one dimensionality, affinely aligned).
        labels: optional label-map paths, one per image (same grid as its image).
        multiple: the network's size divisor.

    Returns:
        ``{"images": float32 (n, 1, *shape), "labels": int32 (n, 1, *shape)}`` (labels 0 without
        label maps).

    Raises:
        ValueError: fewer than 2 images, mixed dimensionalities, labels that do not match.
    """
    if len(images) < 2:
        raise ValueError(f"training needs at least 2 images, got {len(images)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} label maps for {len(images)} images")
    arrays = [load(p).data for p in images]
    if len({a.ndim for a in arrays}) != 1 or arrays[0].ndim not in (2, 3):
        raise ValueError(f"images must all be 2D or all 3D, got shapes {[a.shape for a in arrays]}")
    maps = [np.zeros(a.shape, np.int32) for a in arrays] if labels is None else [load(p).data for p in labels]
    for path, a, m in zip(images, arrays, maps):
        if m.shape != a.shape:
            raise ValueError(f"label map of {path} has shape {m.shape}, the image {a.shape}")
    shape = tuple(-(-max(s) // multiple) * multiple for s in zip(*(a.shape for a in arrays)))
    return {"images": np.stack([center_crop_or_pad(normalize_intensity(a), shape) for a in arrays])[:, None],
            "labels": np.stack([center_crop_or_pad(np.rint(m).astype(np.int32), shape) for m in maps])[:, None]}


def describe_files(paths: list) -> str:
    """A short description of training files for the checkpoint config."""
    return f"{len(paths)} files: " + ", ".join(Path(p).name for p in paths[:8]) + (" ..." if len(paths) > 8 else "")
