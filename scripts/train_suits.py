"""Train the SUITS FeatCNN that ppreg ships (ppreg/learned/models/suits_2d, and its MIND stage suits_2d_mind).

Data: the bundled real brains only (``ppreg.learned.data.slice_bank('train')``: the train split of the
1 mm axial slice stacks of Colin27 and MNI152, 17 planes each; validation and test planes are never
seen; the ITK T1/PD example slices are never used). Multi-modal pairs are synthesised on the fly
(:func:`ppreg.learned.suits_recipe.sample_multimodal_pair`): the fixed image is the real T1 slice, the
moving one a random-intensity-per-tissue-class contrast of the (other or same) brain's labels, both
deformed by independent random diffeomorphisms and intensity-augmented. Stage 1: MIND-SSC replicator
(L1); stage 2: SUITS Algorithm 1 (cross entropy of the warped tissue labels). Everything is seeded.

Training writes resumable checkpoint folders (``--out`` and ``--out``-pretrain: weights, Adam state,
log); ``--export`` then writes the shipped forms (weights, config and log, no optimiser state) to
``EXPORT`` (stage 2) and ``EXPORT``_mind (stage 1).

``--init`` fine-tunes stage 2 from an exported model (fresh Adam state; ``--seed`` then only draws
new pairs), ``--lr-drop`` lowers stage 2's rate from a step on, ``--regularize update`` trains with the
test-time step (the diffusion term on each update; tried in DESIGN.md item 46, not shipped).

Usage (from the repository root). The shipped model: the stage-1 run of 700 steps, then Algorithm 1
with the defaults, lambda 1 and the feature warm-up of ``TRAIN_CONFIG``, for 3000 steps; then 2400
fine-tuning steps from those weights at seed 1 (its ``config.json`` records both, the earlier run
under ``training.previous``)::

    nice -n 10 python scripts/train_suits.py --pretrain-steps 700 --steps 3000 --out runs/suits2d \\
        --export runs/suits2d_s0
    nice -n 10 python scripts/train_suits.py --pretrain-steps 0 --steps 2400 --init runs/suits2d_s0 --seed 1 \\
        --lr-drop 1800 0.1 --out runs/suits2d_ft --export ppreg/learned/models/suits_2d
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ppreg.learned import checkpoint
from ppreg.learned.data import slice_bank
from ppreg.learned.suits import REGULARIZE, WARMUPS
from ppreg.learned.suits_recipe import TRAIN_CONFIG, pretrain_path, train_suits

PAIRS = {"p_inter": 0.5, "p_synth": 0.8}


def export(src: Path, dst: Path) -> None:
    """Write the shipped form of checkpoint ``src`` (no optimiser state, rounded loss log) to ``dst``."""
    saved = checkpoint.load(src)
    log = json.loads((src / checkpoint.LOG_FILE).read_text())
    checkpoint.save(dst, saved.model, architecture=saved.config["architecture"], kwargs=saved.config["kwargs"],
                    training=saved.config["training"],
                    log={"step": log["step"], "loss": [round(v, 5) for v in log["loss"]],
                         "time_s": [round(v, 2) for v in log["time_s"]]})


def main(argv=None) -> None:
    """Parse the arguments and train."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--pretrain-rate", type=float, default=1e-3)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--lam", type=float, default=TRAIN_CONFIG.lam, help="diffusion weight of Algorithm 1's steps")
    p.add_argument("--iterations", type=int, default=TRAIN_CONFIG.iterations, help="k_back is drawn from 1..this")
    p.add_argument("--warmup", choices=WARMUPS, default=TRAIN_CONFIG.warmup,
                   help="what drives Algorithm 1's untracked steps (labels: as printed)")
    p.add_argument("--regularize", choices=REGULARIZE, default=TRAIN_CONFIG.regularize,
                   help="what the diffusion term of every step acts on: total (Eq. 4) or update")
    p.add_argument("--init", type=Path, default=None,
                   help="start stage 2 from this FeatCNN checkpoint (fine-tuning; needs --pretrain-steps 0)")
    p.add_argument("--lr-drop", nargs=2, action="append", default=[], metavar=("STEP", "FACTOR"),
                   help="multiply stage 2's learning rate by FACTOR from optimiser step STEP on (repeatable)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--export", type=Path, default=None, help="also write the shipped forms here (and here_mind)")
    args = p.parse_args(argv)
    data = "ppreg.learned.data.slice_bank('train'): Colin27 + MNI152 1 mm slices, tissue labels"
    config = dataclasses.replace(TRAIN_CONFIG, lam=args.lam, iterations=args.iterations,
                                 warmup=args.warmup, regularize=args.regularize)
    start = time.perf_counter()
    pre, result = train_suits(slice_bank("train"), pretrain_steps=args.pretrain_steps, steps=args.steps,
                              batch_size=args.batch_size, seed=args.seed, out=args.out, config=config,
                              pretrain_rate=args.pretrain_rate, learning_rate=args.learning_rate,
                              pair_options=PAIRS, checkpoint_every=args.checkpoint_every, data=data,
                              init=args.init, lr_drops={int(k): float(f) for k, f in args.lr_drop} or None)
    if args.export is not None:
        export(args.out, args.export)
        if pre is not None:
            export(pretrain_path(args.out), args.export.with_name(args.export.name + "_mind"))
    pre_text = "" if pre is None else f"MIND L1 {pre.losses[:20].mean():.4f} -> {pre.losses[-20:].mean():.4f}; "
    print(f"trained in {time.perf_counter() - start:.0f} s; {pre_text}SUITS CE {result.losses[:20].mean():.4f} -> "
          f"{result.losses[-20:].mean():.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
