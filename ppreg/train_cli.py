"""``ppreg train vxm-diff|suits``: train a VoxelMorph-diff model or a SUITS FeatCNN on the user's own NIfTI files.

Pairs are drawn from the given images (inter-subject, each deformed by a random diffeomorphism and
intensity-augmented, :func:`ppreg.learned.recipes.train_vxm_diff`), so a handful of affinely aligned
scans is enough to start. The output folder is a checkpoint (``config.json``, ``weights.safetensors``,
``train_state.safetensors``, ``log.json``) that ``ppreg register --transform vxm-diff --model``
reads; rerunning the same command resumes an interrupted run.

``suits`` (Blendowski et al. 2020; :func:`ppreg.learned.suits_recipe.train_suits`) needs ``--labels``
(tissue or structure maps): the moving image of every pair is a contrast synthesised from its labels
(random intensity per label), the fixed one the real image; stage 1 (``--pretrain-steps``, MIND-SSC
replicator) is written to ``OUTPUT-pretrain``, stage 2 (Algorithm 1, ``--steps``) to ``OUTPUT``, which
``ppreg register --transform suits --model OUTPUT`` reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .options import VXM_TRAIN_LOSS

NIFTI = (".nii", ".nii.gz")


def add_parsers(sub) -> None:
    """Add the ``train`` subcommand to the ``ppreg`` parser."""
    p = sub.add_parser("train", help="train a learned registration model on your NIfTI files")
    p.add_argument("method", choices=("vxm-diff", "suits"),
                   help="vxm-diff: VoxelMorph-diff (Dalca et al. 2019); suits: SUITS features (Blendowski et al. 2020)")
    p.add_argument("--images", nargs="+", type=Path, required=True,
                   help="a folder of NIfTI files, a text file listing one path per line, or the paths themselves")
    p.add_argument("--labels", nargs="+", type=Path, default=None,
                   help="label maps in the same order (folder, list file or paths): the surface term and "
                        "label-synthesised contrasts use them")
    p.add_argument("-o", "--output", type=Path, required=True, help="model folder (resumed when it exists)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000; suits: of Algorithm 1)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="suits: MIND-SSC replicator steps before Algorithm 1 (default: --steps / 2)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    p.add_argument("--learning-rate", type=float, default=None, help="Adam step (default 1e-3; suits: 2e-4)")
    p.add_argument("--image-loss", choices=("ssd", "lncc"), default=VXM_TRAIN_LOSS["image_loss"])
    p.add_argument("--image-sigma", type=float, default=VXM_TRAIN_LOSS["image_sigma"],
                   help=f"sigma_I of the image term (default {VXM_TRAIN_LOSS['image_sigma']})")
    p.add_argument("--lam", type=float, default=VXM_TRAIN_LOSS["lam"],
                   help=f"prior precision lambda ({VXM_TRAIN_LOSS['lam']})")
    p.add_argument("--unidirectional", action="store_true", help="warp only the moving image (default: both ways)")
    p.add_argument("--surface-sigma", type=float, default=None,
                   help="sigma_s (voxels) of the surface term of Eq. 10-11 (needs --labels; default off)")
    p.add_argument("--crop", type=lambda t: tuple(int(c) for c in t.split(",")), default=None,
                   help="train on random crops of this shape, e.g. 64,64,64 (multiples of 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, pairs and samples (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--restart", action="store_true", help="ignore an existing train state in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _paths(items: list[Path], what: str, error) -> list[Path]:
    if len(items) == 1 and items[0].is_dir():
        found = sorted(p for p in items[0].iterdir() if p.name.endswith(NIFTI))
        if not found:
            raise error(f"no NIfTI files in {what} folder {items[0]}")
        return found
    if len(items) == 1 and items[0].suffix == ".txt":
        try:
            lines = [ln.strip() for ln in items[0].read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise error(f"cannot read {what} list {items[0]}: {exc}") from None
        return [p if p.is_absolute() else items[0].parent / p for p in map(Path, lines)]
    return list(items)


def run_train(args, error) -> int:
    """Run ``ppreg train``; ``error`` is the CLI's user-facing exception class."""
    # the learned stack (equinox, the networks) loads here, not when any ppreg command starts
    from .learned.recipes import DEFAULT_LOSS, MODEL_KWARGS, bank_from_files, describe_files, train_vxm_diff

    images = _paths(args.images, "--images", error)
    labels = None if args.labels is None else _paths(args.labels, "--labels", error)
    missing = [str(p) for p in images + (labels or []) if not p.exists()]
    if missing:
        raise error(f"no such file: {', '.join(missing[:5])}")
    if args.surface_sigma is not None and labels is None:
        raise error("--surface-sigma needs --labels")
    if args.method == "suits":
        return _run_suits(args, images, labels, error)
    if args.pretrain_steps is not None:
        raise error("--pretrain-steps applies to suits only")
    try:
        config = dataclasses.replace(DEFAULT_LOSS, image_loss=args.image_loss, image_sigma=args.image_sigma,
                                     lam=args.lam, bidirectional=not args.unidirectional,
                                     surface_sigma=args.surface_sigma)
        bank = bank_from_files(images, labels)
        ndim = bank["images"].ndim - 2
        result = train_vxm_diff(bank, ndim=ndim, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                out=args.output, loss_config=config, model_kwargs=MODEL_KWARGS[ndim],
                                pair_options={"p_inter": 0.75, "p_synth": 0.25 if labels is not None else 0.0,
                                              "n_labels": int(bank["labels"].max()) + 1},
                                crop=args.crop, learning_rate=args.learning_rate or 1e-3,
                                checkpoint_every=args.checkpoint_every, data=describe_files(images),
                                progress=not args.quiet, resume=not args.restart)
    except (ValueError, TypeError, FileExistsError) as exc:
        raise error(str(exc)) from None
    print(f"trained vxm-diff for {args.steps} steps on {len(images)} images ({ndim}D): loss "
          f"{result.losses[0]:.4g} -> {result.losses[-1]:.4g}; wrote {args.output}")
    return 0


def _run_suits(args, images, labels, error) -> int:
    """``ppreg train suits``: both stages of :func:`ppreg.learned.suits_recipe.train_suits`."""
    from .learned.recipes import bank_from_files, describe_files
    from .learned.suits_recipe import train_suits

    if labels is None:
        raise error("suits trains on label maps (Algorithm 1's cross entropy, the synthesised contrast): pass --labels")
    pretrain = args.steps // 2 if args.pretrain_steps is None else args.pretrain_steps
    if pretrain < 0:
        raise error(f"--pretrain-steps must be >= 0, got {pretrain}")
    try:
        bank = bank_from_files(images, labels)
        if bank["labels"].max() < 1:
            raise ValueError("the label maps hold only the background (0); suits needs at least one structure")
        pre, result = train_suits(bank, pretrain_steps=pretrain, steps=args.steps, batch_size=args.batch_size,
                                  seed=args.seed, out=args.output, crop=args.crop,
                                  learning_rate=args.learning_rate or 2e-4, n_labels=int(bank["labels"].max()) + 1,
                                  model_kwargs={"ndim": bank["images"].ndim - 2},
                                  checkpoint_every=args.checkpoint_every, data=describe_files(images),
                                  progress=not args.quiet, resume=not args.restart)
    except (ValueError, TypeError, FileExistsError) as exc:
        raise error(str(exc)) from None
    stage1 = "" if pre is None else f"MIND L1 {pre.losses[0]:.4g} -> {pre.losses[-1]:.4g}, "
    print(f"trained suits ({pretrain} + {args.steps} steps) on {len(images)} images: {stage1}cross entropy "
          f"{result.losses[0]:.4g} -> {result.losses[-1]:.4g}; wrote {args.output}")
    return 0
