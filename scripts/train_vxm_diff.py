"""Train the VoxelMorph-diff models that ppreg ships (ppreg/learned/models/vxm_diff_{2d,3d}).

Data: the bundled real brains only (``ppreg.learned.data``): 2D, the *train* split of the 1 mm
axial slice stacks of Colin27 and MNI152 (17 planes each; validation and test planes are never
seen); 3D, Colin27 at 2 mm (MNI152 is the held-out subject). Pairs are synthesised on the fly
(``ppreg.learned.synth.make_training_pair``: random diffeomorphisms of the training family,
intensity augmentation, half of the 2D pairs inter-subject, a quarter label-synthesised).
Everything is seeded (data, pairs, initial weights); CPU float reductions are not bitwise repeatable,
so a rerun follows the same loss curve, not the same bytes (ppreg/learned/models/README.md).

Training writes a resumable checkpoint folder (``--out``: weights, Adam state, log); ``--export``
then writes the shipped form (weights, config and log, no optimiser state).

Usage (from the repository root; the shipped models)::

    python scripts/train_vxm_diff.py --ndim 2 --steps 9000 --lr-drop 8000 0.1 --out runs/vxm2d --export ppreg/learned/models/vxm_diff_2d
    # 3D, two phases on one --out (the second resumes the first; the checkpoint's "pairs_history" records both)
    python scripts/train_vxm_diff.py --ndim 3 --steps 6250 --lr-drop 5750 0.3 --deform-factor 1 --max-norm 12 36 \
        --checkpoint-every 250 --out runs/vxm3d
    python scripts/train_vxm_diff.py --ndim 3 --steps 19000 --lr-drop 5750 0.3 --lr-drop 16000 0.3 \
        --checkpoint-every 250 --out runs/vxm3d --export ppreg/learned/models/vxm_diff_3d

ppreg/learned/models/README.md says which steps the shipped models stopped at and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ppreg.learned import checkpoint
from ppreg.learned.data import slice_bank, volume_bank
from ppreg.learned.recipes import DEFAULT_LOSS, train_vxm_diff

PAIRS = {  # make_training_pair options per dimensionality
    2: {"p_inter": 0.5, "p_synth": 0.25, "synth_contrast": "shared", "max_norm": 12.0},  # 12: chosen on validation
    # 3D: deformations drawn at half resolution (5x faster); bounds set to move the brain as much as the held-out
    # fields do (models/README.md)
    3: {"p_inter": 0.0, "p_synth": 0.25, "synth_contrast": "shared", "max_norm": [6.0, 30.0], "deform_factor": 2},
}
CROP = {2: None, 3: (48, 48, 48)}
BATCH = {2: 8, 3: 1}


def main(argv=None) -> None:
    """Parse the arguments and train."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ndim", type=int, choices=(2, 3), required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lr-drop", nargs=2, action="append", default=None, metavar=("STEP", "FACTOR"),
                   help="multiply the learning rate by FACTOR from optimiser step STEP on (repeatable)")
    p.add_argument("--lam", type=float, default=DEFAULT_LOSS.lam)
    p.add_argument("--image-sigma", type=float, default=DEFAULT_LOSS.image_sigma)
    p.add_argument("--image-loss", choices=("ssd", "lncc"), default=DEFAULT_LOSS.image_loss)
    p.add_argument("--sigma", type=float, nargs="+", default=None,
                   help="training-family velocity smoothing in voxels; several values: a random mixture of scales")
    p.add_argument("--max-norm", type=float, nargs="+", default=None,
                   help="training-family velocity bound in voxels; two values: a range drawn per image")
    p.add_argument("--deform-factor", type=int, default=None,
                   help="draw the training deformations on the level of this shrink factor (2: half resolution)")
    p.add_argument("--crop", type=int, nargs="+", default=None,
                   help="train on random crops of this shape (multiples of 16; default: 3D 48^3, 2D whole slices)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--export", type=Path, default=None, help="also write the shipped form (no optimiser state) here")
    args = p.parse_args(argv)
    config = dataclasses.replace(DEFAULT_LOSS, lam=args.lam, image_sigma=args.image_sigma, image_loss=args.image_loss)
    if args.ndim == 2:
        bank, data = slice_bank("train"), "ppreg.learned.data.slice_bank('train'): Colin27 + MNI152 1 mm slices"
    else:
        bank, data = volume_bank("train"), "ppreg.learned.data.volume_bank('train'): Colin27 at 2 mm"
    pairs = dict(PAIRS[args.ndim])
    if args.sigma is not None:
        pairs["sigma"] = args.sigma[0] if len(args.sigma) == 1 else list(args.sigma)
    if args.max_norm is not None:
        pairs["max_norm"] = args.max_norm[0] if len(args.max_norm) == 1 else list(args.max_norm)
    if args.deform_factor is not None:
        pairs["deform_factor"] = args.deform_factor
    start = time.perf_counter()
    result = train_vxm_diff(bank, ndim=args.ndim, steps=args.steps, batch_size=args.batch_size or BATCH[args.ndim],
                            seed=args.seed, out=args.out, loss_config=config, pair_options=pairs,
                            crop=tuple(args.crop) if args.crop else CROP[args.ndim], learning_rate=args.learning_rate,
                            lr_drops={int(k): float(f) for k, f in args.lr_drop or ()},
                            checkpoint_every=args.checkpoint_every, data=data)
    if args.export is not None:
        saved = checkpoint.load(args.out)
        log = json.loads((args.out / checkpoint.LOG_FILE).read_text())
        checkpoint.save(args.export, saved.model, architecture=saved.config["architecture"],
                        kwargs=saved.config["kwargs"], training=saved.config["training"],
                        log={"step": log["step"], "loss": [round(v, 5) for v in log["loss"]]})
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; loss {result.losses[:20].mean():.4f} "
          f"-> {result.losses[-20:].mean():.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
