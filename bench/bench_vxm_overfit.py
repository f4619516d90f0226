"""Can the shipped VoxelMorph-diff recipe overfit a handful of fixed training pairs? (issue 12, 3D model)

The shipped 3D model stayed near the identity after 1000-3900 random-pair steps, which earlier notes put
down to the CPU budget. This probe takes the budget out: it draws ``--pairs`` training pairs once (the
*train* split, each image deformed by its own random diffeomorphism bounded by ``--max-norm`` voxels, no
label synthesis, no inter-subject pairs; 3D on random 48^3 crops of Colin27 at 2 mm), then cycles Adam
(``--learning-rate``, 1e-3) over those same pairs with the shipped network widths (``MODEL_KWARGS``) and
loss (``DEFAULT_LOSS``: Eq. 6 of Dalca et al. 2019, lncc window 9, bidirectional). It prints, per tenth
of the run, the mean image term (``1 + lncc``, lower is better), the KL term, the mean |mu| (half-resolution voxels) on the
first pair and the mean tissue Dice of all pairs (moving labels warped by ``exp(mu)``; the identity's
Dice is printed first). A recipe that can learn should drive the image term down and the Dice up on
pairs it sees over and over. The identity's Dice also tells whether the pairs need registering at all:
in 3D a bound of 12 voxels leaves them at 0.96 (mean |u| 0.6 voxels per image), so there is nothing to learn.

Usage: python bench/bench_vxm_overfit.py --ndim {2,3} [--pairs 4] [--steps 200] [--max-norm 12]
       [--encoder-features 16 32 32 32 32 --decoder-features 32 32 32 32] [--lncc-window 9] [--learning-rate 1e-3]
       [--out bench/results/bench_vxm_overfit_3d.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
from common import print_header, write_results  # noqa: E402

from ppreg.learned.data import slice_bank, volume_bank  # noqa: E402
from ppreg.learned.recipes import DEFAULT_LOSS, MODEL_KWARGS, pair_loss, sample_pair  # noqa: E402
from ppreg.learned.vxm import VxmDiff, predict  # noqa: E402
from ppreg.metrics import mean_dice  # noqa: E402
from bench_learned import warp_labels  # noqa: E402

CROP = {2: None, 3: (48, 48, 48)}


def pair_dice(pairs: list[dict], model=None) -> float:
    """Mean tissue Dice (labels 1-3) of the moving labels warped by ``exp(mu)`` (the identity without a model)."""
    out = []
    for pair in pairs:
        u = (jnp.zeros(pair["fixed"].shape + (pair["fixed"].ndim,)) if model is None
             else predict(model, pair["fixed"], pair["moving"])["displacement"])
        warped = warp_labels(pair["moving_labels"], u)
        out.append(mean_dice(np.asarray(pair["fixed_labels"]), warped, labels=[1, 2, 3]))
    return float(np.mean(out))


def run(ndim: int, pairs: int, steps: int, max_norm: float, model_kwargs: dict, config=DEFAULT_LOSS,
        learning_rate: float = 1e-3) -> list[dict]:
    """Rows of ``{"step", "image", "kl", "mu_abs", "dice", "seconds"}``, one per tenth of ``steps``."""
    bank = volume_bank("train") if ndim == 3 else slice_bank("train")
    bank = {"images": jnp.asarray(bank["images"], jnp.float32), "labels": jnp.asarray(bank["labels"], jnp.int32)}
    options = dict(p_inter=0.0, p_synth=0.0, max_norm=max_norm)
    fixed_pairs = [sample_pair(jax.random.key(100 + i), bank, crop=CROP[ndim], **options) for i in range(pairs)]
    model = VxmDiff(**model_kwargs, key=jax.random.key(0))
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state, key, pair):
        (_, terms), grad = eqx.filter_value_and_grad(
            lambda m: pair_loss(m, key, pair, config=config), has_aux=True)(model)
        updates, state = optimizer.update(grad, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, terms

    print(f"identity: tissue Dice {pair_dice(fixed_pairs):.4f}", flush=True)
    block, rows, images, start = max(1, steps // 10), [], [], time.perf_counter()
    for s in range(steps):
        model, state, terms = step(model, state, jax.random.key(s), fixed_pairs[s % pairs])
        images.append(float(terms["image"]))
        if (s + 1) % block == 0:
            mu, _ = model(fixed_pairs[0]["fixed"], fixed_pairs[0]["moving"])
            rows.append({"step": s + 1, "image": float(np.mean(images[-block:])), "kl": float(terms["kl"]),
                         "mu_abs": float(jnp.mean(jnp.abs(mu))), "dice": pair_dice(fixed_pairs, model),
                         "seconds": time.perf_counter() - start})
            r = rows[-1]
            print(f"{r['step']} | {r['image']:.4f} | {r['kl']:.3f} | {r['mu_abs']:.3f} | {r['dice']:.4f} | "
                  f"{r['seconds']:.0f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ndim", type=int, choices=(2, 3), required=True)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-norm", type=float, default=12.0)
    ap.add_argument("--encoder-features", type=int, nargs="+", default=None, help="default: the shipped widths")
    ap.add_argument("--decoder-features", type=int, nargs="+", default=None, help="default: the shipped widths")
    ap.add_argument("--lncc-window", type=int, default=DEFAULT_LOSS.lncc_window)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/bench_vxm_overfit_{ndim}d.json)")
    args = ap.parse_args()
    print_header(["step", "image term (block mean)", "KL", "mean |mu| (pair 0)", "tissue Dice (all pairs)", "seconds"])
    kwargs = dict(MODEL_KWARGS[args.ndim])
    for name in ("encoder_features", "decoder_features"):
        if getattr(args, name) is not None:
            kwargs[name] = tuple(getattr(args, name))
    config = dataclasses.replace(DEFAULT_LOSS, lncc_window=args.lncc_window)
    rows = run(args.ndim, args.pairs, args.steps, args.max_norm, kwargs, config, args.learning_rate)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"bench_vxm_overfit_{args.ndim}d.json")
    write_results(out, {"rows": rows}, ndim=args.ndim, pairs=args.pairs, steps=args.steps, max_norm=args.max_norm,
                  lncc_window=args.lncc_window, learning_rate=args.learning_rate,
                  model_kwargs={k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


if __name__ == "__main__":
    main()
