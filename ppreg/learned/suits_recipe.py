"""Training recipe of SUITS in 2D: multi-modal pairs synthesised from real brains, two stages.

Used by ``scripts/train_suits.py`` (the shipped model) and ``ppreg train suits`` (a user's files).

**Pairs** (:func:`sample_multimodal_pair`). :func:`ppreg.learned.synth.make_training_pair` draws a
slice of the bank, the fixed and moving subjects (inter-subject with probability ``p_inter``) and
deforms each by an independent random diffeomorphism (images linear, labels nearest neighbour),
then intensity-augments both. The fixed image stays the real T1 (stream 0 of the FeatCNN); the
moving image is replaced, with probability ``p_synth``, by a *second contrast*: a random intensity
per tissue class of its warped label map (:func:`ppreg.learned.synth.synth_from_labels`,
SynthMorph-style), blurred and augmented (gamma, bias field, noise) -- so the second stream sees
T1-unlike contrasts such as proton density (CSF bright, white matter dark) without ever seeing a
real PD image. The labels become one-hot maps for Algorithm 1's cross entropy. An optional random
crop (offset a multiple of 16) keeps a CPU step cheap; the network is fully convolutional.

**Stages** (Blendowski et al. 2020, Sec. 4.2): (1) pre-training as a MIND-SSC replicator
(:func:`ppreg.learned.suits.mind_replicator_loss`, learning rate 1e-3 here), (2) Algorithm 1
(:func:`ppreg.learned.suits.suits_loss`, :data:`TRAIN_CONFIG`) from the pre-trained weights, learning
rate 1e-4 by default (the shipped model: 3e-4; the paper's 1e-5 is for many more steps than a CPU
budget allows). Both run in
:func:`ppreg.learned.train.train` (checkpoints, resume): stage 1 in ``<out>-pretrain`` (a checkpoint folder holds nothing else), stage 2 in
``out``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint
from .featcnn import FeatCNN
from .recipes import random_crop
from .suits import SuitsConfig, mind_replicator_loss, suits_loss
from .synth import augment_intensity, make_training_pair, synth_from_labels
from .train import TrainResult, train

__all__ = ["ARCHITECTURE", "MODEL_KWARGS", "TRAIN_CONFIG", "pretrain_path", "sample_multimodal_pair", "train_suits"]

ARCHITECTURE = "FeatCNN"
MODEL_KWARGS = {"ndim": 2}  # Table 1 widths, 4 MIND-SSC channels in 2D
TRAIN_CONFIG = SuitsConfig(iterations=8, lam=1.0, cg_maxiter=100, cg_tol=1e-4, warmup="features")
"""Algorithm 1 settings of the shipped model: ``k_back`` in 1..8 (the paper: 15; the CPU budget), lambda 1
(near the test-time weight; the paper trains at 5), the untracked steps driven by the network's own
features (DESIGN.md item 32: with the label warm-up as printed, training made the features worse than
their MIND start on validation pairs)."""
PRETRAIN_SUFFIX = "-pretrain"


def sample_multimodal_pair(key, bank: dict, *, n_labels: int = 4, p_inter: float = 0.5, p_synth: float = 1.0,
                           crop: tuple[int, ...] | None = None, sigma: float = 8.0, max_norm: float = 4.0) -> dict:
    """One multi-modal training pair: real fixed image, label-synthesised moving contrast, one-hot labels.

    Args:
        key: JAX PRNG key.
        bank: ``{"images": float32 (S, N, *spatial) in [0, 1], "labels": int (S, N, *spatial)}``
            (:func:`ppreg.learned.data.slice_bank`), labels in ``0 .. n_labels - 1``.
        n_labels: label count including the background (static; 4 for the tissue classes).
        p_inter: probability of an inter-subject pair.
        p_synth: probability that the moving image is the synthesised second contrast (else the
            augmented real image: a mono-modal pair).
        crop: static crop shape (sizes multiples of 16), or ``None``.
        sigma, max_norm: random-diffeomorphism family (:func:`ppreg.learned.synth.random_diffeomorphism`).

    Returns:
        dict: ``"fixed"``, ``"moving"`` float32 ``(*shape)`` in [0, 1]; ``"fixed_labels"``,
        ``"moving_labels"`` float32 one-hot ``(*shape, n_labels)``.

    Raises:
        TypeError / ValueError: as :func:`ppreg.learned.synth.make_training_pair`.

    Source: pairs after Dalca et al. 2019; the second contrast after Hoffmann et al. 2022
    (SynthMorph), Sec. II-C; the use for SUITS' multi-modal training is ours (the paper trains on
    real CT/MR pairs).
    """
    k_pair, k_synth, k_aug, k_use, k_crop = jax.random.split(key, 5)
    pair = make_training_pair(k_pair, bank, p_inter=p_inter, p_synth=0.0, sigma=sigma, max_norm=max_norm)
    synth = augment_intensity(k_aug, synth_from_labels(k_synth, pair["moving_labels"], n_labels=n_labels))
    moving = jnp.where(jax.random.uniform(k_use, ()) < p_synth, synth, pair["moving"])
    out = {"fixed": pair["fixed"], "moving": jnp.clip(moving, 0.0, 1.0),
           "fixed_labels": pair["fixed_labels"], "moving_labels": pair["moving_labels"]}
    out = out if crop is None else random_crop(k_crop, out, tuple(crop))
    for name in ("fixed_labels", "moving_labels"):
        out[name] = jax.nn.one_hot(out[name], n_labels, dtype=jnp.float32)
    return out


def _pretrain_loss(model, key, pair):
    del key
    return mind_replicator_loss(model, pair["fixed"], pair["moving"]), {}


def _suits_loss(model, key, pair, *, config):
    return suits_loss(model, key, pair, config=config)


def train_suits(bank: dict, *, pretrain_steps: int, steps: int, batch_size: int = 3, seed: int = 0, out=None,
                config: SuitsConfig = TRAIN_CONFIG, model_kwargs: dict | None = None, crop=None,
                pretrain_rate: float = 1e-3, learning_rate: float = 1e-4, n_labels: int = 4,
                pair_options: dict | None = None, checkpoint_every: int = 25, data: str = "",
                progress: bool = True, resume: bool = True, init=None,
                lr_drops: dict | None = None) -> tuple[TrainResult | None, TrainResult]:
    """Train a 2D FeatCNN: MIND-SSC replicator pre-training, then SUITS Algorithm 1.

    Args:
        bank: as :func:`sample_multimodal_pair`.
        pretrain_steps: stage-1 optimiser steps (0: start stage 2 from random weights).
        steps: stage-2 (Algorithm 1) optimiser steps.
        batch_size: pairs per step (the paper: 3).
        seed: fixes weights, pairs and ``k_back`` draws.
        out: checkpoint folder of stage 2; stage 1 goes to :func:`pretrain_path` ``(out)``; both stages
            resume when present.
        config: :class:`ppreg.learned.suits.SuitsConfig` of Algorithm 1.
        model_kwargs: :class:`FeatCNN` kwargs (default :data:`MODEL_KWARGS`).
        crop: training crop shape (multiples of 16) or ``None``.
        pretrain_rate, learning_rate: Adam steps of the two stages.
        n_labels: label classes in the bank (one-hot depth).
        pair_options: more keyword options of :func:`sample_multimodal_pair`.
        checkpoint_every: steps per checkpoint.
        data: description of the training data stored in the checkpoint.
        progress, resume: see :func:`ppreg.learned.train.train`.
        init: a FeatCNN checkpoint folder whose weights start stage 2 (fine-tuning, fresh Adam state;
            needs ``pretrain_steps=0`` and its kwargs equal to ``model_kwargs``), or ``None``.
        lr_drops: ``{step: factor}`` rate drops of stage 2 (:func:`ppreg.learned.train.adam`).

    Returns:
        ``(pretrain_result or None, suits_result)`` (:class:`ppreg.learned.train.TrainResult`).

    Raises:
        ValueError: a bank that is not 2D/3D slices of sizes divisible by 4, bad counts, an ``init``
            with pre-training or of another architecture or kwargs.
        ppreg.learned.checkpoint.CheckpointError: an unreadable ``init``.
    """
    kwargs = dict(MODEL_KWARGS if model_kwargs is None else model_kwargs)
    shape = np.shape(bank["images"])
    if len(shape) != kwargs["ndim"] + 2:
        raise ValueError(f"a {kwargs['ndim']}D bank must be (subjects, items, *spatial), got {shape}")
    spatial = tuple(crop) if crop is not None else shape[2:]
    if any(n % 4 for n in spatial):
        raise ValueError(f"training shape {spatial} must be divisible by 4")
    if pretrain_steps < 0 or steps < 1:
        raise ValueError(f"need pretrain_steps >= 0 and steps >= 1, got {pretrain_steps}, {steps}")
    key_model, key_pre, key_train = jax.random.split(jax.random.key(seed), 3)
    if init is None:
        model, start = FeatCNN(**kwargs, key=key_model), None
    else:
        model, start = _init_model(init, kwargs, pretrain_steps)
    options = dict(pair_options or {}, n_labels=n_labels, crop=None if crop is None else tuple(crop))
    sample = partial(sample_multimodal_pair, **options)
    bank = {"images": jnp.asarray(bank["images"], jnp.float32), "labels": jnp.asarray(bank["labels"], jnp.int32)}
    training = {"data": data, "seed": seed, "pairs": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in options.items()},
                "bank_shape": list(shape), "script": "ppreg.learned.suits_recipe.train_suits"}
    if start is not None:
        training["init"] = start
    out = None if out is None else Path(out)
    pre = None
    if pretrain_steps:
        pre = train(model, sample, _pretrain_loss, bank, steps=pretrain_steps, batch_size=batch_size, key=key_pre,
                    learning_rate=pretrain_rate, out=None if out is None else pretrain_path(out),
                    checkpoint_every=checkpoint_every, architecture=ARCHITECTURE, kwargs=kwargs,
                    training={**training, "stage": "mind-replicator"}, resume=resume, progress=progress)
        model = pre.model
    result = train(model, sample, partial(_suits_loss, config=config), bank, steps=steps, batch_size=batch_size,
                   key=key_train, learning_rate=learning_rate, lr_drops=lr_drops, out=out,
                   checkpoint_every=checkpoint_every, architecture=ARCHITECTURE, kwargs=kwargs,
                   training={**training, "stage": "suits-algorithm-1", "suits": dataclasses.asdict(config),
                             "pretrain_steps": pretrain_steps, "pretrain_rate": pretrain_rate},
                   resume=resume, progress=progress)
    return pre, result


def _init_model(init, kwargs: dict, pretrain_steps: int) -> tuple[FeatCNN, dict]:
    """The FeatCNN of checkpoint ``init``, checked against the run's ``kwargs``, and its record for the
    training config (path and weights' sha256)."""
    if pretrain_steps:
        raise ValueError("a run from init weights starts at stage 2: pretrain_steps must be 0")
    saved = checkpoint.load(init)
    if saved.config["architecture"] != ARCHITECTURE or saved.config["kwargs"] != kwargs:
        raise ValueError(f"init {init} is {saved.config['architecture']} {saved.config['kwargs']}, "
                         f"not {ARCHITECTURE} {kwargs}")
    return saved.model, {"path": str(init), "weights_sha256": saved.config["weights_sha256"]}


def pretrain_path(out) -> Path:
    """Folder of the stage-1 (MIND replicator) checkpoint of a :func:`train_suits` run writing ``out``."""
    out = Path(out)
    return out.with_name(out.name + PRETRAIN_SUFFIX)
