"""Learned registration (VoxelMorph-diff) on held-out data: accuracy, uncertainty and inference time.

The benchmark of issue 12. Every case is held out: test-split slices (never trained on), a
different subject, or a deformation family the model never saw (training pairs are random SVF
diffeomorphisms; the synthetic cases here are cubic B-spline fields,
``ppreg.learned.synth.make_test_pair(family="bspline")`` with its default spacing 16 and amplitude
4 voxels, one fixed seed per case). In a synthetic case ``moving`` is the clean image and ``fixed``
its warp by the true field ``u_true``, so ``moving(x + u_true(x)) = fixed(x)``.

``--ndim 2`` (model: the shipped 2D model, or ``--model PATH``):

- ``test slices``: the 6 test-split slices of both subjects (``slice_bank("test")``), 12 pairs.
  Dice labels: Colin27's AAL regions, MNI152's tissue classes (``"labels"``); the fixed labels are
  the moving labels warped by ``u_true`` (nearest neighbour).
- ``ITK PD slice``: ``BrainProtonDensitySlice`` (another subject, 217 x 181, never trained on),
  scaled into [0, 1], deformed by 3 fields. No labels; RMSE mask: fixed image > 0.05.
- ``inter-subject``: real pairs at the 6 test planes, moving Colin27, fixed MNI152; tissue Dice
  (``"labels"``: the same intensity rule for both subjects).
- ``--validation``: instead of those, the 12 validation slices of both subjects (24 pairs, the
  same held-out B-spline family): for choosing a model or its training length, never the test cases.

``--ndim 3`` (the shipped 3D model, or ``--model PATH``), 2 mm voxels:

- ``MNI152 3D``: the held-out subject (``volume_bank("test")``) deformed by 3 fields; Dice on its
  reference tissue classes.
- ``inter-subject 3D``: the real pair of ``volume_bank()``, moving Colin27, fixed MNI152; tissue Dice.
- ``--validation``: instead of those, the training subject Colin27 under 3 held-out B-spline fields
  of their own seeds (tissue Dice): the 3D bank has no third subject, so this checks a 3D model (or
  its training length) without touching MNI152.

Scores per pair: mean Dice of the fixed labels and the moving labels warped by the predicted
field (nearest neighbour); RMSE of the predicted displacement against ``u_true`` inside the brain
(the fixed tissue labels > 0; ``ppreg.metrics.field_rmse``, mm); folding voxels
(``ppreg.metrics.folding``, det J <= 0); and the Pearson correlation, over the same brain voxels,
of vxm-diff's predicted standard deviation ``sqrt(uncertainty)`` with its actual error
``|u_pred - u_true|``, and the spread of that predicted std over the same voxels (its coefficient of
variation, std / mean: near 0 means an almost constant uncertainty map).

Methods (rows): identity (u = 0); ppreg vxm-diff (``register_vxm``: posterior mean of the default
passes, ``ppreg.options.VXM_PASSES``, 16 samples for the uncertainty); where the default has more than
one pass (or with ``--passes``), ppreg vxm-diff (1 pass) (VoxelMorph's single forward pass of the same
network); ppreg classical SVF (``register(fixed, moving, transform="svf", loss="lncc")``; every image
here is already in [0, 1]); and VoxelMorph 0.3.4 (``bench/peer_voxelmorph.py``, plain
``int_steps=0`` and diffeomorphic ``int_steps=7``), trained on exactly the batches of the ppreg
model: the seed, steps, batch size, learning rate, pair options and crop are read from the
checkpoint's ``config["training"]`` and the batches are drawn by ppreg's own sampler
(``recipes.sample_pair``) from the keys ``ppreg.learned.train.train`` derives from that seed.
The peer's objective is its own (NCC with lambda 1 when the ppreg model used lncc, else MSE with
lambda 0.01: the VoxelMorph paper's settings). Trained peers are cached in
``bench/results/peers/`` under a hash of their configuration.

Training budget: every row and summary carries ``budget`` (``"trained S steps x batch B"`` for the
learned rows, read from the checkpoint for ppreg and from the peer's configuration for VoxelMorph;
``"per-pair optimisation"`` for classical SVF; ``"-"`` for the identity), printed as a column of the
tables; the JSON's ``budgets`` gives steps, batch size and pairs seen per learned row and
``equal_budget`` says whether the peers trained on exactly the ppreg model's steps (``--peer-steps``
breaks that and is flagged in ``notes``). A smaller equal-budget comparison than the shipped model's is
made by training a model with fewer steps (``scripts/train_vxm_diff.py --steps N --out DIR``) and
passing it as ``--model DIR``: the peers then replay that model's batches.

Inference time on CPU: vxm-diff's ``predict`` (one plain pass, and the default symmetric passes where
there are several) at batch 1 as ``register_vxm`` runs it (a host loop of compiled passes) and at batch 8
(one jitted ``jax.vmap``, 2D) on a 256 x 256 test pair (3D: one
96 x 112 x 96 volume), first call (compilation) apart from the warm median of 5
(``block_until_ready``); the peer's ``time_inference`` likewise.

Usage: python bench/bench_learned.py [--ndim 2|3] [--model PATH] [--cases N] [--skip-svf]
       [--peers | --no-peers] [--peer-variants 0,7] [--peer-steps N] [--validation] [--passes 1,2,4]
       [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ppreg import register
from ppreg.data import load_sample
from ppreg.grid import identity_grid
from ppreg.learned import recipes
from ppreg.learned.data import center_crop_or_pad, normalize_intensity, slice_bank, volume_bank
from ppreg.learned.register import register_vxm, resolve_model, shipped_model_path
from ppreg.learned.synth import make_test_pair
from ppreg.learned.vxm import predict
from ppreg.metrics import field_rmse, folding, mean_dice
from ppreg.options import VXM_PASSES
from ppreg.warp import interpolate_nearest

import peer_voxelmorph as peer
from common import fmt, print_header, time_jax, write_results

SAMPLES = 16  # vxm-diff posterior samples for the uncertainty
SEEDS = {"test slices": 1200, "ITK PD slice": 1300, "MNI152 3D": 1400, "validation Colin27 3D": 1500}  # + case
PD_CASES = 3
MNI_CASES = 3
PD_MASK = 0.05  # RMSE mask of the PD slice: fixed image > this (image in [0, 1])
TIME_SHAPE_2D = (256, 256)
TIME_BATCH = 8
TIME_REPEATS = 5
PEER_DIR = "bench/results/peers"
PEER_LAMBDA = {"ncc": 1.0, "mse": 0.01}  # VoxelMorph (Balakrishnan et al. 2019), Sec. IV-C
BANKS = {2: lambda: slice_bank("train"), 3: lambda: volume_bank("train")}  # what the shipped models train on


# ----------------------------------------------------------------------------------------------- cases

def _case(family, name, fixed, moving, *, fixed_labels=None, moving_labels=None, u_true=None, mask=None,
          spacing=1.0):
    """One registration case: numpy arrays, labels and truth where known."""
    as_np = lambda x, dtype: None if x is None else np.array(x, dtype)  # noqa: E731 (a writable copy)
    return {"family": family, "name": name, "fixed": as_np(fixed, np.float32), "moving": as_np(moving, np.float32),
            "fixed_labels": as_np(fixed_labels, np.int32), "moving_labels": as_np(moving_labels, np.int32),
            "u_true": as_np(u_true, np.float32), "mask": as_np(mask, bool), "spacing": float(spacing)}


def synthetic_case(family, name, key, image, labels, brain_labels, spacing=1.0):
    """``make_test_pair`` (held-out B-spline family); the brain mask is the warped ``brain_labels`` > 0."""
    pair = make_test_pair(key, image, labels, family="bspline")
    brain = make_test_pair(key, image, brain_labels, family="bspline")["fixed_labels"] > 0  # same key, same field
    return _case(family, name, pair["fixed"], pair["moving"], fixed_labels=pair["fixed_labels"],
                 moving_labels=pair["moving_labels"], u_true=pair["displacement"], mask=brain, spacing=spacing)


def test_slice_cases(split: str = "test"):
    """Test slices of both subjects (interleaved: slice 3 Colin27, slice 3 MNI152, ...); ``split="validation"``:
    the validation slices the same way (family ``validation slices``, for choosing training options)."""
    bank = slice_bank(split)
    family = "test slices" if split == "test" else f"{split} slices"
    for i, s in enumerate(np.asarray(bank["slices"]).tolist()):
        for subject, name in enumerate(("colin27", "mni152")):
            labels = bank["aal"][i] if subject == 0 else bank["labels"][1, i]
            key = jax.random.key(SEEDS["test slices"] + 100 * subject + s)
            yield synthetic_case(family, f"{name} slice {s}", key, bank["images"][subject, i], labels,
                                 bank["labels"][subject, i])


def pd_slice_cases():
    """The ITK PD slice scaled into [0, 1] under held-out B-spline fields (no labels)."""
    image = normalize_intensity(load_sample("BrainProtonDensitySlice").data)
    for j in range(PD_CASES):
        pair = make_test_pair(jax.random.key(SEEDS["ITK PD slice"] + j), image, family="bspline")
        yield _case("ITK PD slice", f"PD field {j}", pair["fixed"], pair["moving"], u_true=pair["displacement"],
                    mask=np.asarray(pair["fixed"]) > PD_MASK)


def inter_subject_slice_cases():
    """Real pairs at the test planes: moving Colin27, fixed MNI152, tissue labels."""
    bank = slice_bank("test")
    for i, s in enumerate(np.asarray(bank["slices"]).tolist()):
        yield _case("inter-subject", f"slice {s}", bank["images"][1, i], bank["images"][0, i],
                    fixed_labels=bank["labels"][1, i], moving_labels=bank["labels"][0, i])


def mni152_volume_cases():
    """The held-out 3D subject under held-out B-spline fields (2 mm voxels)."""
    bank = volume_bank("test")
    for j in range(MNI_CASES):
        key = jax.random.key(SEEDS["MNI152 3D"] + j)
        yield synthetic_case("MNI152 3D", f"MNI152 field {j}", key, bank["images"][0, 0], bank["reference_tissue"],
                             bank["reference_tissue"], spacing=2.0)


def colin27_validation_cases():
    """3D validation: the training subject (Colin27) under held-out B-spline fields of their own seeds."""
    bank = volume_bank("train")
    for j in range(MNI_CASES):
        key = jax.random.key(SEEDS["validation Colin27 3D"] + j)
        yield synthetic_case("validation Colin27 3D", f"Colin27 field {j}", key, bank["images"][0, 0],
                             bank["labels"][0, 0], bank["labels"][0, 0], spacing=2.0)


def inter_subject_volume_cases():
    """The real 3D pair: moving Colin27, fixed MNI152, tissue labels."""
    bank = volume_bank(None)
    yield _case("inter-subject 3D", "Colin27 -> MNI152", bank["images"][1, 0], bank["images"][0, 0],
                fixed_labels=bank["labels"][1, 0], moving_labels=bank["labels"][0, 0], spacing=2.0)


FAMILIES = {2: (test_slice_cases, pd_slice_cases, inter_subject_slice_cases),
            3: (mni152_volume_cases, inter_subject_volume_cases)}
VALIDATION = {2: (partial(test_slice_cases, "validation"),), 3: (colin27_validation_cases,)}


# --------------------------------------------------------------------------------------------- scoring

def warp_labels(labels, u):
    """Nearest-neighbour pull-back of a label map by a displacement."""
    return np.asarray(interpolate_nearest(jnp.asarray(labels), identity_grid(labels.shape) + jnp.asarray(u)))


def std_error_correlation(variance, u, u_true, mask):
    """Pearson correlation over ``mask`` of ``sqrt(variance)`` with ``|u - u_true|`` (None if either is constant)."""
    std = np.sqrt(np.maximum(variance[mask], 0.0))
    error = np.linalg.norm(u[mask] - u_true[mask], axis=-1)
    if std.std() == 0 or error.std() == 0:
        return None
    return float(np.corrcoef(std, error)[0, 1])


def std_spread(variance, mask) -> float | None:
    """Coefficient of variation (std / mean) over ``mask`` of the predicted std ``sqrt(variance)``."""
    std = np.sqrt(np.maximum(variance[mask], 0.0))
    return None if std.mean() == 0 else float(std.std() / std.mean())


def score(case, u, variance) -> dict:
    """Dice, RMSE against the truth, folding and the std-error correlation of a displacement on a case."""
    out = {"dice": None, "rmse_vox": None, "rmse_mm": None, "std_error_r": None, "std_cv": None,
           "folding": folding(u)["voxels"]}
    if case["fixed_labels"] is not None:
        out["dice"] = mean_dice(case["fixed_labels"], warp_labels(case["moving_labels"], u))
    if case["u_true"] is not None:
        rmse = field_rmse(u, case["u_true"], spacing=[case["spacing"]] * u.shape[-1], mask=case["mask"])
        out["rmse_vox"], out["rmse_mm"] = rmse["voxels"], rmse["mm"]
        if variance is not None:
            out["std_error_r"] = std_error_correlation(variance, u, case["u_true"], case["mask"])
            out["std_cv"] = std_spread(variance, case["mask"])
    return out


# --------------------------------------------------------------------------------------------- methods

def identity_method(fixed, moving):
    return np.zeros(fixed.shape + (fixed.ndim,), np.float32), None


def vxm_method(ckpt, fixed, moving, **passes):
    r = register_vxm(fixed, moving, model=ckpt, samples=SAMPLES, **passes)
    return r.displacement(), r.uncertainty


def svf_method(fixed, moving):
    return register(fixed, moving, transform="svf", loss="lncc").displacement(), None


def peer_method(model, fixed, moving):
    return peer.predict(model, fixed, moving), None


def run_case(case, name, method, budget: str = "-") -> dict:
    t0 = time.perf_counter()
    u, variance = method(case["fixed"], case["moving"])
    seconds = time.perf_counter() - t0
    return {"family": case["family"], "case": case["name"], "method": name, "budget": budget,
            "shape": list(case["fixed"].shape), **score(case, u, variance), "time_s": seconds}


def training_budget(steps: int, batch_size: int) -> dict:
    return {"steps": int(steps), "batch_size": int(batch_size), "pairs_seen": int(steps) * int(batch_size),
            "text": f"trained {int(steps)} steps x batch {int(batch_size)}"}


def budgets_of(ckpt, peer_info: dict) -> dict:
    """``{row name: budget dict}`` of the learned rows: the ppreg model's (its checkpoint) and the peers'."""
    training = ckpt.config.get("training") or {}
    steps = training.get("steps_done", training.get("steps"))
    out = {"ppreg vxm-diff": (training_budget(steps, training["batch_size"]) if steps is not None
                              and training.get("batch_size") is not None else {"text": "unknown (no training record)"})}
    for name, info in peer_info.items():
        cfg = info["config"]
        out[name] = {**training_budget(cfg["steps"], cfg["batch_size"]),
                     "same_batches_as_ppreg": cfg["steps"] == cfg["ppreg_steps"]}
    return out


# ----------------------------------------------------------------------------------------------- peers

class PeerSkip(Exception):
    """The peer cannot be trained on the ppreg model's data (the reason is the message)."""


def peer_setup(ckpt, ndim: int, steps_override: int | None, reg_weight: float | None) -> dict:
    """The peer's training configuration, read from the ppreg checkpoint's ``config["training"]``.

    Raises:
        PeerSkip: the checkpoint was not trained by ``recipes.train_vxm_diff`` on the bundled bank.
    """
    training = ckpt.config.get("training") or {}
    if training.get("script") != "ppreg.learned.recipes.train_vxm_diff":
        raise PeerSkip(f"model {ckpt.path} was not trained by recipes.train_vxm_diff: its data cannot be replayed")
    bank = BANKS[ndim]()
    if list(np.shape(bank["images"])) != list(training.get("bank_shape", [])):
        raise PeerSkip(f"model {ckpt.path} was trained on a bank of shape {training.get('bank_shape')} "
                       f"({training.get('data')!r}), not the bundled one {list(np.shape(bank['images']))}")
    loss = "ncc" if training["loss"]["image_loss"] == "lncc" else "mse"
    crop = None if training.get("crop") is None else tuple(training["crop"])
    config = {"ndim": ndim, "data": training.get("data"), "bank_shape": training["bank_shape"],
              "seed": int(training["seed"]), "steps": int(training.get("steps_done", training["steps"])),
              "batch_size": int(training["batch_size"]), "learning_rate": float(training["learning_rate"]),
              "pairs": training.get("pairs") or {}, "crop": None if crop is None else list(crop),
              "inshape": list(crop or np.shape(bank["images"])[2:]), "loss": loss,
              "reg_weight": PEER_LAMBDA[loss] if reg_weight is None else float(reg_weight),
              "ppreg_steps": int(training.get("steps_done", training["steps"])), "vxm_version": peer.VXM_VERSION}
    if steps_override is not None:
        config["steps"] = int(steps_override)
    bank = {"images": jnp.asarray(bank["images"], jnp.float32), "labels": jnp.asarray(bank["labels"], jnp.int32)}
    return {"config": config, "bank": bank}


def ppreg_batches(setup):
    """The training batches of the ppreg model, as numpy: the key chain of ``ppreg.learned.train.train``
    (``key_train`` of ``recipes.train_vxm_diff``; per step ``key, sub = split(key)``, the pair keys
    ``split(sub, (batch, 2))[:, 0]``) fed to ``recipes.sample_pair``."""
    cfg = setup["config"]
    crop = None if cfg["crop"] is None else tuple(cfg["crop"])
    sample = jax.jit(jax.vmap(partial(recipes.sample_pair, crop=crop, **cfg["pairs"]), in_axes=(0, None)))
    _, key = jax.random.split(jax.random.key(cfg["seed"]))
    while True:
        key, sub = jax.random.split(key)
        keys = jax.random.split(sub, (cfg["batch_size"], 2))
        pair = sample(keys[:, 0], setup["bank"])
        yield {"fixed": np.asarray(pair["fixed"]), "moving": np.asarray(pair["moving"])}


def peer_cache_path(config: dict, int_steps: int) -> str:
    digest = hashlib.sha256(json.dumps({**config, "int_steps": int_steps}, sort_keys=True).encode()).hexdigest()
    return os.path.join(PEER_DIR, f"vxm_{config['ndim']}d_int{int_steps}_{digest[:16]}.pt")


def load_or_train_peer(setup, int_steps: int):
    """A cached peer, or one trained now (and cached) on the ppreg batches."""
    cfg = setup["config"]
    path = peer_cache_path(cfg, int_steps)
    if os.path.exists(path):
        print(f"[peer] loading cached {path}", flush=True)
        return peer.load_model(path), path
    print(f"[peer] training VoxelMorph int_steps={int_steps}: {cfg['steps']} steps x batch {cfg['batch_size']}, "
          f"loss {cfg['loss']}, lambda {cfg['reg_weight']}, lr {cfg['learning_rate']} -> {path}", flush=True)
    model = peer.train_vxmdense(ppreg_batches(setup), inshape=cfg["inshape"], steps=cfg["steps"],
                                learning_rate=cfg["learning_rate"], loss=cfg["loss"], reg_weight=cfg["reg_weight"],
                                int_steps=int_steps, seed=cfg["seed"], log_every=max(cfg["steps"] // 10, 1))
    os.makedirs(PEER_DIR, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    peer.save_model(tmp, model)
    os.replace(tmp, path)
    return model, path


def peer_name(int_steps: int) -> str:
    return f"VoxelMorph {peer.VXM_VERSION} (int_steps={int_steps})"


def build_peers(args, ckpt, notes) -> tuple[dict, dict]:
    """``({row name: model}, {row name: info})``; reasons for skipping go to ``notes``."""
    if not args.peers:
        return {}, {}
    if not peer.available():
        notes.append("VoxelMorph peer skipped: torch / voxelmorph>=0.3 / neurite not installed (the bench extra)")
        return {}, {}
    try:
        setup = peer_setup(ckpt, args.ndim, args.peer_steps, args.peer_reg_weight)
    except PeerSkip as exc:
        notes.append(f"VoxelMorph peer skipped: {exc}")
        return {}, {}
    cfg = setup["config"]
    if cfg["steps"] != cfg["ppreg_steps"]:
        notes.append(f"--peer-steps {cfg['steps']}: the peer trained {cfg['steps']} steps, the ppreg model "
                     f"{cfg['ppreg_steps']}: NOT the same budget (a quick check, not a comparison)")
    models, info = {}, {}
    for int_steps in args.peer_variants:
        model, path = load_or_train_peer(setup, int_steps)
        models[peer_name(int_steps)] = model
        info[peer_name(int_steps)] = {"cache": path, "config": cfg, "train_info": getattr(model, "train_info", None)}
    return models, info


# ---------------------------------------------------------------------------------------------- timing

def time_pair(ndim: int):
    """The pair timed: the first test case, 2D padded/cropped to 256 x 256."""
    case = next(FAMILIES[ndim][0]())
    if ndim == 2:
        return center_crop_or_pad(case["fixed"], TIME_SHAPE_2D), center_crop_or_pad(case["moving"], TIME_SHAPE_2D)
    return case["fixed"], case["moving"]


def timing_rows(ckpt, peers: dict, ndim: int) -> list[dict]:
    """Inference time per pair of vxm-diff (predict as register_vxm runs it; batched: one jitted vmap) and the
    peers, batch 1 and batched (2D)."""
    fixed, moving = time_pair(ndim)
    f, m, key = jnp.asarray(fixed), jnp.asarray(moving), jax.random.key(0)
    fb, mb = jnp.stack([f] * TIME_BATCH), jnp.stack([m] * TIME_BATCH)
    passes = VXM_PASSES[ndim]
    runs = []
    configs = [("ppreg vxm-diff (1 pass)", 1, False)]
    if passes > 1:
        configs.append((f"ppreg vxm-diff ({passes} symmetric passes)", passes, True))
    for label, p, sym in configs:
        o = {"passes": p, "symmetric": sym}
        # batch 1 as register_vxm runs it: a host loop of compiled passes
        mean_only = lambda model, a, b, o=o: predict(model, a, b, jit_each_pass=True, **o)["displacement"]  # noqa: E731
        with_samples = lambda model, a, b, k, o=o: predict(  # noqa: E731
            model, a, b, key=k, samples=SAMPLES, jit_each_pass=True, **o)
        batched = eqx.filter_jit(
            lambda model, a, b, o=o: jax.vmap(lambda x, y: predict(model, x, y, **o)["displacement"])(a, b))
        runs += [(label, 1, partial(time_jax, mean_only, ckpt.model, f, m, repeats=TIME_REPEATS)),
                 (f"{label} + {SAMPLES} samples", 1, partial(time_jax, with_samples, ckpt.model, f, m, key,
                                                             repeats=TIME_REPEATS))]
        if ndim == 2:
            runs.append((label, TIME_BATCH, partial(time_jax, batched, ckpt.model, fb, mb, repeats=TIME_REPEATS)))
    for name, model in peers.items():
        runs.append((name, 1, partial(time_peer, model, fixed, moving, 1)))
        if ndim == 2:
            runs.append((name, TIME_BATCH, partial(time_peer, model, fixed, moving, TIME_BATCH)))
    rows = []
    for name, batch, run in runs:
        t = run()
        rows.append({"method": name, "shape": list(fixed.shape), "batch": batch, "first_call_s": t["first_s"],
                     "warm_s_per_pair": t["warm_s"] / batch})
    return rows


def time_peer(model, fixed, moving, batch: int) -> dict:
    """The peer's first call (no compilation in torch: allocation and warm-up), then ``time_inference``."""
    f, m = (fixed, moving) if batch == 1 else (np.stack([fixed] * batch), np.stack([moving] * batch))
    t0 = time.perf_counter()
    peer.predict(model, f, m)
    first = time.perf_counter() - t0
    warm = peer.time_inference(model, fixed, moving, repeats=TIME_REPEATS, batch_size=batch) * batch
    return {"first_s": first, "warm_s": warm}


# ------------------------------------------------------------------------------------------- reporting

def _values(rows, key):
    return [r[key] for r in rows if r[key] is not None]


def summarize(rows) -> list[dict]:
    """Mean and worst case per (family, method): worst Dice = min, RMSE = max, folding = max, r = min,
    std CV = min (the flattest uncertainty map)."""
    out = []
    for family, method in dict.fromkeys((r["family"], r["method"]) for r in rows):
        group = [r for r in rows if r["family"] == family and r["method"] == method]
        s = {"family": family, "method": method, "budget": group[0].get("budget", "-"), "pairs": len(group),
             "time_s_median": statistics.median(r["time_s"] for r in group)}
        for key, worst in (("dice", min), ("rmse_mm", max), ("folding", max), ("std_error_r", min),
                           ("std_cv", min)):
            values = _values(group, key)
            s[f"{key}_mean"] = float(np.mean(values)) if values else None
            s[f"{key}_worst"] = worst(values) if values else None
        out.append(s)
    return out


SUMMARY_COLUMNS = ("method", "budget", "pairs", "Dice mean", "Dice worst", "RMSE mm mean", "RMSE mm worst",
                   "folding mean", "folding max", "std-err r mean", "std-err r worst", "std CV mean",
                   "s/pair (median)")


def print_summary(family: str, summary: list[dict]) -> None:
    print(f"\n{family}")
    print_header(SUMMARY_COLUMNS)
    for s in summary:
        if s["family"] != family:
            continue
        print(" | ".join([s["method"], s["budget"], str(s["pairs"]), fmt(s["dice_mean"], ".3f"),
                          fmt(s["dice_worst"], ".3f"), fmt(s["rmse_mm_mean"], ".2f"), fmt(s["rmse_mm_worst"], ".2f"),
                          fmt(s["folding_mean"], ".1f"), fmt(s["folding_worst"], "d"),
                          fmt(s["std_error_r_mean"], ".2f"), fmt(s["std_error_r_worst"], ".2f"),
                          fmt(s["std_cv_mean"], ".3f"), fmt(s["time_s_median"], ".2f")]), flush=True)


def print_timing(rows: list[dict]) -> None:
    print("\ninference time per pair (CPU)")
    print_header(("method", "budget", "shape", "batch", "first call s", "warm ms/pair"))
    for r in rows:
        print(" | ".join([r["method"], r.get("budget", "-"), "x".join(map(str, r["shape"])), str(r["batch"]),
                          f"{r['first_call_s']:.2f}", f"{1e3 * r['warm_s_per_pair']:.1f}"]), flush=True)


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ndim", type=int, choices=(2, 3), default=2)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model for --ndim)")
    ap.add_argument("--cases", type=int, default=None, help="at most this many pairs per case family (quick checks)")
    ap.add_argument("--skip-svf", action="store_true", help="leave out the classical SVF rows")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                    help="VoxelMorph 0.3.4 peer rows (default: on in 2D, off in 3D where training is costly)")
    ap.add_argument("--peer-variants", default="0,7",
                    help="comma-separated int_steps of the peers: 0 plain VoxelMorph, 7 diffeomorphic")
    ap.add_argument("--peer-steps", type=int, default=None,
                    help="train the peer this many steps instead of the ppreg model's (quick checks only)")
    ap.add_argument("--peer-reg-weight", type=float, default=None,
                    help="the peer's lambda (default: 1 with NCC, 0.01 with MSE)")
    ap.add_argument("--no-timing", action="store_true", help="skip the inference-time table")
    ap.add_argument("--passes", default=None,
                    help="comma-separated counts of symmetric vxm-diff passes, one row each (for choosing the "
                         "default on --validation); default: the default passes and one plain pass")
    ap.add_argument("--validation", action="store_true",
                    help="score only the validation cases (for choosing a model; never the test cases): 2D the "
                         "validation slices, 3D the training subject under held-out fields")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/bench_learned_{ndim}d.json)")
    args = ap.parse_args(argv)
    args.peers = (args.ndim == 2) if args.peers is None else args.peers
    args.peer_variants = [int(v) for v in args.peer_variants.split(",") if v.strip()]
    args.out = args.out or f"bench/results/bench_learned_{args.ndim}d{'_validation' if args.validation else ''}.json"
    return args


def main(argv=None):
    args = parse_args(argv)
    model_path = args.model or str(shipped_model_path(args.ndim))
    if not os.path.isdir(model_path):
        raise SystemExit(f"no model at {model_path}: train one (scripts/train_vxm_diff.py) or pass --model PATH")
    ckpt = resolve_model(model_path, args.ndim)
    notes = []
    peers, peer_info = build_peers(args, ckpt, notes)
    methods = {"identity": identity_method}
    if args.passes:
        methods.update({f"ppreg vxm-diff ({p} symmetric pass{'' if int(p) == 1 else 'es'})":
                        partial(vxm_method, ckpt, passes=int(p), symmetric=True) for p in args.passes.split(",")})
    else:
        methods["ppreg vxm-diff"] = partial(vxm_method, ckpt)
    if args.passes or VXM_PASSES[args.ndim] > 1:
        methods["ppreg vxm-diff (1 pass)"] = partial(vxm_method, ckpt, passes=1, symmetric=False)
    if not args.skip_svf:
        methods["ppreg svf (lncc)"] = svf_method
    methods.update({name: partial(peer_method, model) for name, model in peers.items()})
    budgets = budgets_of(ckpt, peer_info)
    row_budget = {"identity": "-", "ppreg svf (lncc)": "per-pair optimisation",
                  **{name: b["text"] for name, b in budgets.items()}}
    row_budget.update({name: row_budget["ppreg vxm-diff"] for name in methods if name.startswith("ppreg vxm-diff")})
    equal_budget = None if not peer_info else all(b.get("same_batches_as_ppreg") for b in budgets.values()
                                                 if "same_batches_as_ppreg" in b)
    for name, b in budgets.items():
        print(f"budget: {name}: {b['text']}", flush=True)
    for note in notes:
        print(f"NOTE: {note}", flush=True)

    rows = []
    families = VALIDATION[args.ndim] if args.validation else FAMILIES[args.ndim]
    for family_cases in families:
        for n, case in enumerate(family_cases()):
            if args.cases is not None and n >= args.cases:
                break
            for name, method in methods.items():
                rows.append(run_case(case, name, method, row_budget.get(name, "-")))
                print(f"[{case['family']}] {case['name']} | {name} | " + ", ".join(
                    f"{k} {fmt(rows[-1][k], '.3f')}" for k in ("dice", "rmse_mm", "std_error_r", "time_s"))
                    + f", folding {rows[-1]['folding']}", flush=True)
    summary = summarize(rows)
    for family in dict.fromkeys(r["family"] for r in rows):
        print_summary(family, summary)
    timing = [] if args.no_timing else timing_rows(ckpt, peers, args.ndim)
    for r in timing:
        r["budget"] = row_budget["ppreg vxm-diff" if r["method"].startswith("ppreg vxm-diff") else r["method"]]
    if timing:
        print_timing(timing)
    for note in notes:
        print(f"NOTE: {note}")
    config = {k: v for k, v in ckpt.config.items() if k != "tensors"}
    write_results(args.out, {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                             "args": vars(args),
                             "model": {"path": str(ckpt.path), "config": config}, "peers": peer_info,
                             "budgets": budgets, "equal_budget": equal_budget,
                             "notes": notes, "summary": summary, "timing": timing, "rows": rows},
                  **({"peer_versions": peer.versions()} if peers else {}))


if __name__ == "__main__":
    main()
