"""The ``ppreg`` command.

``ppreg register FIXED MOVING -o OUTDIR [...]`` writes ``warped.nii.gz``,
``displacement.nii.gz``, ``transform.json`` and ``report.json`` into OUTDIR. All are first
written to a staging directory beside OUTDIR, then moved in one by one with
``os.replace``: a failure at any point leaves OUTDIR as it was. ``ppreg apply`` resamples
another image (or a label map, nearest neighbour) with a saved transform. ``ppreg demo`` runs the bundled known-answer case
clear and under MPC and prints a table in the shape of Taiello et al. 2024, Table 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from . import __version__, batch_cli, party_cli, train_cli
from ._atomic import atomic_write_text, publish_folder, staged_folder
from .grid import identity_grid
from .image import Image, load, load_field, save, save_field
from .itk import embed3, is_itk_transform, read_itk, write_itk
from .plot import require_matplotlib, save_registration_figure
from .metrics import displacement_rmse
from .sampling import METHODS
from .bspline import control_grid_shape, displacement
from .data import load_sample
from .optim import DENSE_OPTIMIZERS
from .options import (BSPLINE_LBFGS_BENDING, BSPLINE_LBFGS_ITERATIONS, DEFAULT_REGULARIZATION, DEFAULT_STEP, DEFAULTS,
                      DEFORMABLE, DENSE_ITERATIONS, DENSE_OPTIMIZER, DENSE_SIGMA, FLUID_SIGMA, FLUID_SIGMA_OTHER, LOSSES,
                      SUITS_LAMBDA, SVF_FINEST_ITERATIONS, SVF_FINEST_ITERATIONS_OTHER, TRANSFORMS, VXM_PASSES)
from .register import register
from .space import INITS, reduce_affine, world_affine
from .svf import compose
from .svf import exp as svf_exp
from .transforms import apply_matrix
from .warp import interpolate, interpolate_nearest

DEMO_FIXED = "BrainProtonDensitySliceBorder20"
DEMO_MOVING = "BrainProtonDensitySliceR10X13Y17"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ppreg: error: ...``, status 2); ``--help`` still shows usage."""

    def error(self, message):
        self.exit(2, f"ppreg: error: {message} (see '{self.prog} --help')\n")


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive integers, got {text!r}")
    return levels


def _dense_counts(optimizer: str) -> str:
    return "{}, {} at full resolution".format(*DENSE_ITERATIONS[optimizer])


def _iterations(text: str):
    """``N`` (every level) or ``N1,N2,...`` (one count per level, svf and dense)."""
    try:
        counts = _levels(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"max-iterations must be a positive integer or a comma-separated list, "
                                         f"got {text!r}") from None
    return counts[0] if len(counts) == 1 else counts


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fraction must be a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"fraction must be in (0, 1], got {value}")
    return value


def _add_registration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transform", choices=TRANSFORMS, default="rigid")
    p.add_argument("--loss", choices=LOSSES, default="ssd",
                   help="ssd, mi (Mattes mutual information, multi-modal), ncc, lncc (local NCC: svf, dense, "
                        "bspline) or mind (MIND-SSC: svf, dense, bspline); bspline with a loss other than ssd runs "
                        "L-BFGS")
    p.add_argument("--bins", type=int, default=32, help="histogram bins for --loss mi (default 32)")
    p.add_argument("--secure", choices=("none", "mpc", "ckks"), default="none",
                   help="none: clear; mpc: two-party secret sharing with a dealer; ckks: homomorphic encryption "
                        "(TenSEAL, the fhe extra; linear transforms and bspline)")
    p.add_argument("--ckks-variant", choices=("v1", "v2", "packed"), default="packed",
                   help="CKKS protocol for --secure ckks (default packed, the fastest; v1/v2 as Taiello et al. 2024)")
    p.add_argument("--sampling", choices=METHODS, default=None, help="voxel sampling per iteration (default: all)")
    p.add_argument("--fraction", type=_fraction, default=0.1, help="sampled fraction of voxels (default 0.1)")
    p.add_argument("--levels", type=_levels, default=(4, 2, 1), help="pyramid shrink factors (default 4,2,1)")
    p.add_argument("--max-iterations", type=_iterations, default=None,
                   help=f"per level, or one count per level for svf and dense (default "
                        f"{DEFAULTS['gauss-newton']['max_iterations']} linear, {DEFAULTS['bspline']['max_iterations']} "
                        f"bspline (ssd), {BSPLINE_LBFGS_ITERATIONS} bspline (other losses, L-BFGS); svf: "
                        f"{DEFAULTS['svf']['max_iterations']}, {SVF_FINEST_ITERATIONS['lncc']} (lncc) or "
                        f"{SVF_FINEST_ITERATIONS_OTHER} at full resolution; dense: {_dense_counts('lbfgs')} lbfgs, "
                        f"{_dense_counts('adam')} adam; vxm-diff: "
                        f"network passes, {VXM_PASSES[2]} in 2D, {VXM_PASSES[3]} in 3D)")
    p.add_argument("--spacing", type=int, default=4, help="bspline control-point spacing in voxels (default 4)")
    p.add_argument("--regularization", type=float, default=None,
                   help=f"bspline: bending-energy weight (default {DEFAULT_REGULARIZATION['bspline']} with ssd, "
                        f"{BSPLINE_LBFGS_BENDING} with another loss); dense: "
                        f"diffusion weight (default {DEFAULT_REGULARIZATION['dense']}); suits: diffusion weight "
                        f"lambda of each Gauss-Newton update (default {SUITS_LAMBDA:g})")
    p.add_argument("--step-size", type=float, default=None,
                   help=f"svf: largest velocity update, level voxels ({DEFAULT_STEP['svf']}); dense: Adam learning "
                        f"rate ({DEFAULT_STEP['dense']})")
    p.add_argument("--fluid-sigma", type=float, default=None,
                   help=f"svf: smoothing of each update, voxels ({FLUID_SIGMA['lncc']} for lncc/mind, else "
                        f"{FLUID_SIGMA_OTHER}); dense: of the lbfgs update variable ({DENSE_SIGMA['lbfgs']}) or of "
                        f"each adam gradient ({DENSE_SIGMA['adam']})")
    p.add_argument("--diffusion-sigma", type=float, default=0.5, help="svf: smoothing of the velocity, voxels (0.5)")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="svf: ANTs-style half-way (symmetric) update (default: on for clear lncc, else off; "
                        "--no-symmetric: one-sided); with --secure mpc, two half velocities, one per party; "
                        "dense: fit a half-way field (default: on for clear lncc with lbfgs, else off); vxm-diff: "
                        "average each pass with the swapped pair's estimate (default: on with more than one pass)")
    p.add_argument("--lncc-open", choices=("smoothed", "force"), default="smoothed",
                   help="--secure mpc svf: what each iteration opens to a party: its force smoothed by --fluid-sigma on "
                        "the shares (default) or the raw per-voxel force")
    p.add_argument("--audit", type=Path, default=None,
                   help="--secure mpc: write the audit log (JSON lines: every quantity opened to each party, its shape "
                        "and the running count); its totals go into report.json")
    p.add_argument("--optimizer", choices=DENSE_OPTIMIZERS, default=None,
                   help=f"dense: optax optimiser ({DENSE_OPTIMIZER})")
    p.add_argument("--plot", action="store_true",
                   help="also write registration.png (checkerboard, overlay, deformed grid; needs ppreg[plot])")
    p.add_argument("--seed", type=int, default=0, help="public sampling seed (default 0)")
    p.add_argument("--frac-bits", type=int, default=16, help="fixed-point fractional bits for --secure mpc")
    p.add_argument("--band-size", type=int, default=None, help="flash: odd Fourier band size per axis (default 15)")
    p.add_argument("--alpha", type=float, default=None, help="flash: smoothness weight of L (default 100)")
    p.add_argument("--sigma", type=float, default=None, help="flash: noise sigma, fraction of max intensity (0.03)")
    p.add_argument("--estimate-alpha", nargs="?", const="laplace", choices=("laplace", "joint", "network"),
                   default=None,
                   help="flash: estimate alpha: laplace (default: marginal MAP, ppreg.spectral.evidence), joint "
                        "(004 Algorithm 1 as published) or network (predicted by the alpha CNN of 004 Sec. 3.2: "
                        "--model, default the shipped 2D model for 100x100, band 15, sigma 0.03)")
    p.add_argument("--model", type=Path, default=None,
                   help="vxm-diff: trained model folder (default: the model shipped for 2D or 3D); suits: a "
                        "trained FeatCNN folder (default: the shipped 2D model); flash --estimate-alpha network: "
                        "a trained AlphaCNN folder (default: the shipped 2D model)")
    p.add_argument("--samples", type=int, default=None,
                   help="vxm-diff: posterior samples for uncertainty.nii.gz (default 16; 0: none)")
    p.add_argument("--histogram-matching", action="store_true",
                   help="clear: match the moving image's histogram to the fixed one's before registering (SSD across "
                        "intensity scales; the written warped image keeps the moving image's own intensities)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ppreg", description="Privacy-preserving image registration.")
    parser.add_argument("--version", action="version", version=f"ppreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="register MOVING to FIXED (NIfTI files)")
    reg.add_argument("fixed", type=Path)
    reg.add_argument("moving", type=Path)
    reg.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    _add_registration_options(reg)
    reg.add_argument("--init", choices=INITS, default="header",
                     help="starting alignment in world (mm) space: header (the images' affines, default), center "
                          "(centres of mass) or moments (centres and principal axes); clear registration")
    app = sub.add_parser("apply", help="resample an image with a saved transform onto a reference grid")
    app.add_argument("image", type=Path, help="image (or label map) in the moving image's grid")
    app.add_argument("-t", "--transform", type=Path, required=True, action="append",
                     help="transform.json or displacement.nii.gz written by 'ppreg register', or ITK/ANTs files "
                          "(itk_linear.mat/.txt, an ITK displacement field such as itk_warp.nii.gz), repeatable "
                          "in antsApplyTransforms order: a fixed point goes through the first -t first, so "
                          "ppreg's ITK files are '-t itk_warp.nii.gz -t itk_linear.mat'")
    app.add_argument("-r", "--reference", type=Path, required=True, help="the fixed image (output grid)")
    app.add_argument("-o", "--output", type=Path, required=True, help="output NIfTI file")
    app.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                     help="nearest keeps label values and their data type")
    demo = sub.add_parser("demo", help="clear vs MPC registration of bundled real MRI slices")
    demo.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    demo.add_argument("--processes", action="store_true",
                      help="run the MPC rows as three local processes (dealer, fixed, moving) on loopback")
    party_cli.add_parsers(sub, levels_type=_levels, fraction_type=_fraction, iterations_type=_iterations)
    train_cli.add_parsers(sub)
    batch_cli.add_parser(sub, _add_registration_options, INITS)
    return parser


def _load(path: Path, ndim=None) -> Image:
    try:
        return load(path, ndim=ndim)
    except FileNotFoundError:
        raise CLIError(f"no such file: {path}") from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _run_register(args) -> int:
    fixed = _load(args.fixed)
    moving = _load(args.moving)
    if fixed.ndim != moving.ndim:
        raise CLIError(f"fixed image {args.fixed} is {fixed.ndim}D but moving image {args.moving} is {moving.ndim}D")
    try:
        if args.plot:
            require_matplotlib()
        result = register(
            fixed, moving, transform=args.transform, loss=args.loss,
            secure=None if args.secure == "none" else args.secure, sampling=args.sampling, fraction=args.fraction,
            levels=args.levels, max_iterations=args.max_iterations, key=args.seed, frac_bits=args.frac_bits,
            ckks_variant=args.ckks_variant,
            spacing=args.spacing, regularization=args.regularization, bins=args.bins, step_size=args.step_size,
            fluid_sigma=args.fluid_sigma, diffusion_sigma=args.diffusion_sigma, symmetric=args.symmetric,
            optimizer=args.optimizer, flash_options={k: v for k, v in (("band_size", args.band_size), ("alpha", args.alpha),
                                             ("sigma", args.sigma), ("estimate_alpha", args.estimate_alpha or None))
                           if v is not None},
            model=args.model, samples=args.samples, lncc_open=args.lncc_open, init=args.init, audit=args.audit,
            histogram_matching=args.histogram_matching,
        )
        if result.fixed_affine is None:  # drivers that register on one grid: world through the images' headers
            result = result.replace(fixed_affine=world_affine(fixed, fixed.ndim, "fixed"),
                                    moving_affine=world_affine(moving, moving.ndim, "moving"))
    except (ValueError, ArithmeticError, ImportError) as exc:  # ArithmeticError: OverflowError, FloatingPointError,
        # and a secure lncc iteration whose truncations wrapped in every retry (TruncationFailure)
        raise CLIError(str(exc)) from None
    write_outputs(args.output, result, fixed.affine, plot_fixed=fixed.data if args.plot else None,
                  moving_shape=moving.data.shape)
    print(f"{result.transform} registration ({args.secure}): {result.iterations} iterations, "
          f"final mean squared error {result.final_loss:.4f}; wrote {args.output}")
    return 0


def write_outputs(outdir: Path, result, affine, *, plot_fixed=None, moving_shape=None) -> None:
    """Write warped.nii.gz, displacement.nii.gz, transform.json, report.json (and velocity.nii.gz
    for svf; registration.png when ``plot_fixed``, the fixed image, is given) into ``outdir``
    (staged, then moved; ``report.json`` lists the files under ``"files"``, and the files an earlier
    run listed there that this one does not write are removed, so no stale transform of another run
    stays beside the new one), and the ITK files of :func:`ppreg.itk.write_itk` (``itk_linear.mat``,
    ``itk_linear.txt``, ``itk_warp.nii.gz`` for a deformable result; with ``moving_shape``, the moving
    image's voxel counts, also ``fsl_linear.mat`` and ``linear.lta``). A result without affines
    (``fixed_affine`` None) is taken to be on the fixed grid ``affine`` (4x4) for both images."""
    with staged_folder(outdir) as stage:
        # the files are independent: written by a thread pool (gzip and NIfTI serialisation release the GIL)
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            jobs = [pool.submit(save, Image(result.warped, affine), stage / "warped.nii.gz"),
                    pool.submit(save_field, result.displacement(), stage / "displacement.nii.gz", affine=affine)]
            names = ["warped.nii.gz", "displacement.nii.gz", "transform.json", "report.json"]
            for name, field in result.output_fields().items():
                jobs.append(pool.submit(save_field, np.asarray(field), stage / name, affine=affine))
                names.append(name)
            for name, image in result.output_images().items():
                jobs.append(pool.submit(save, Image(np.asarray(image, np.float32), affine), stage / name))
                names.append(name)
            if getattr(result, "fixed_affine", "absent") is None:
                w = reduce_affine(affine, np.ndim(result.warped), "fixed")
                result = result.replace(fixed_affine=w, moving_affine=w)
            itk = None
            if hasattr(result, "world_transform"):
                itk = pool.submit(write_itk, stage, result, fixed_shape=np.shape(result.warped),
                                  moving_shape=moving_shape)
            for job in jobs:
                job.result()
            if itk is not None:
                names += itk.result()
        if plot_fixed is not None:
            save_registration_figure(stage / "registration.png", plot_fixed, result.warped, result.displacement(),
                                     title=f"ppreg {result.transform} ({result.secure or 'clear'})")
            names.append("registration.png")
        atomic_write_text(stage / "transform.json", json.dumps(result.transform_json(), indent=2) + "\n")
        report = {**result.report_json(), "files": sorted(names)}
        atomic_write_text(stage / "report.json", json.dumps(report, indent=2) + "\n")
        publish_folder(stage, outdir, names)


def _transform_coords(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Moving-image voxel coordinates of every reference voxel, from a saved transform."""
    grid = identity_grid(shape)
    if path.name.endswith(".json"):
        try:
            doc = json.loads(path.read_text())
            points = grid
            if doc.get("type") in DEFORMABLE + ("flash",):
                points = grid + _deformable_field(doc, shape, path)
                if "matrix" not in doc:
                    return points
                # images on different grids: the header start, x -> M0 (x + u(x)), below
            if "deformable" in doc:  # pipeline: x -> A (x + u(x))
                points = grid + _deformable_field(doc["deformable"], shape, path)
                doc = doc["linear"]
            mat = np.asarray(doc["matrix"], np.float32)
        except FileNotFoundError:
            raise CLIError(f"no such file: {path}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CLIError(f"{path} is not a ppreg transform.json: {exc}") from None
        if mat.shape != (len(shape) + 1,) * 2:
            raise CLIError(f"{path}: a {len(shape)}D transform needs a {(len(shape) + 1,) * 2} matrix, got {mat.shape}")
        return apply_matrix(mat, points)
    try:
        field, _ = load_field(path)
    except FileNotFoundError:
        raise CLIError(f"no such file: {path}") from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if field.shape[:-1] != tuple(shape):
        raise CLIError(f"displacement {path} has grid {field.shape[:-1]} but the reference grid is {tuple(shape)}")
    return grid + field


def _deformable_field(doc: dict, shape: tuple[int, ...], path: Path):
    if doc["type"] == "flash":
        from .spectral.register import displacement_from_document

        return displacement_from_document(doc, tuple(shape))
    if doc["type"] == "svf":
        velocity = _sibling_field(path, doc["velocity"], shape, "velocity")
        if "fixed_velocity" in doc:  # two halves (two-party symmetric registration)
            half = _sibling_field(path, doc["fixed_velocity"], shape, "fixed_velocity")
            return compose(svf_exp(velocity, steps=int(doc["steps"])), svf_exp(-half, steps=int(doc["steps"])))
        return svf_exp(velocity, steps=int(doc["steps"]))
    if doc["type"] == "dense":
        return _sibling_field(path, doc["displacement"], shape, "displacement")
    return _bspline_field(doc, shape, path)


def _bspline_field(doc: dict, shape: tuple[int, ...], path: Path):
    coeffs = np.asarray(doc["coefficients"], np.float32)
    spacing = int(doc["spacing"])
    expected = control_grid_shape(tuple(shape), spacing) + (len(shape),)
    if coeffs.shape != expected:
        raise CLIError(f"{path}: coefficients of shape {coeffs.shape} do not fit the reference grid {tuple(shape)} "
                       f"at spacing {spacing} (expected {expected})")
    return displacement(coeffs, tuple(shape), spacing)


def _sibling_field(path: Path, name: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The vector field a transform.json names (``velocity``, ``displacement``), checked against the grid."""
    field_path = path.parent / name
    try:
        field, _ = load_field(field_path)
    except FileNotFoundError:
        raise CLIError(f"{path}: its {what} file {field_path} is missing") from None
    if field.shape[:-1] != tuple(shape):
        raise CLIError(f"{what} {field_path} has grid {field.shape[:-1]} but the reference grid is {tuple(shape)}")
    return field


def _itk_coords(paths: list[Path], reference: Image, image: Image) -> np.ndarray:
    """Image voxel coordinates of every reference voxel through ITK transform files (world space).

    Reference voxel ``x`` goes to world ``W_ref x`` (RAS+ mm; 2D: z = 0), through the transforms in the
    order listed, and to the image's continuous index through its affine. That is what
    ``antsApplyTransforms -t T1 -t T2`` does (``p -> T2(T1(p))``: its "last -t is applied first" speaks
    of the image, not of the point; checked against ANTsPy in tests/test_interop_itk.py). Returns float32
    ``(*reference.shape, d)``.
    """
    d = reference.ndim
    try:
        w_ref = embed3(world_affine(reference, d, "reference"))
        w_img = embed3(world_affine(image, d, "image"))
        maps = [read_itk(p) for p in paths]
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    grid = np.asarray(identity_grid(reference.shape), np.float64).reshape(-1, d)
    pts = np.concatenate([grid, np.zeros((grid.shape[0], 3 - d))], axis=1) @ w_ref[:3, :3].T + w_ref[:3, 3]
    for apply in maps:
        pts = apply(pts)
    if d == 2 and np.abs(pts[:, 2]).max() > 1e-3:  # ppreg writes 2D transforms with z the identity
        raise CLIError(f"the transforms {', '.join(map(str, paths))} move points of the 2D reference out of its plane "
                       f"(by up to {np.abs(pts[:, 2]).max():.3g} mm): not a 2D registration")
    inv = np.linalg.inv(w_img)
    idx = pts @ inv[:3, :3].T + inv[:3, 3]
    return np.asarray(idx[:, :d].reshape(tuple(reference.shape) + (d,)), np.float32)


def _run_apply(args) -> int:
    reference = _load(args.reference)
    image = _load(args.image, ndim=reference.ndim)
    paths = list(args.transform)
    itk = [is_itk_transform(p) for p in paths]
    if any(itk):
        if not all(itk):
            raise CLIError("ITK transform files cannot be chained with ppreg's transform.json or displacement.nii.gz; "
                           f"got {', '.join(map(str, paths))}")
        coords = _itk_coords(paths, reference, image)
    elif len(paths) != 1:
        raise CLIError(f"give one ppreg transform (transform.json or displacement.nii.gz), got {len(paths)}")
    else:
        coords = _transform_coords(paths[0], reference.shape)
    if args.interpolation == "nearest":
        out, dtype = interpolate_nearest(image.data, coords), _disk_dtype(args.image)
    else:
        out, dtype = interpolate(image.data, coords), np.float32
    try:
        save(Image(np.asarray(out, np.float32), reference.affine), args.output, dtype=dtype)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(f"wrote {args.output} ({args.interpolation} resampling of {args.image} onto {args.reference})")
    return 0


def _disk_dtype(path: Path):
    return np.dtype(nib.load(path).get_data_dtype())


def demo_rows(processes: bool = False) -> list[dict]:
    """Run the demo cases; one dict per row (Table 2 columns of Taiello et al. 2024)."""
    fixed, moving = load_sample(DEMO_FIXED), load_sample(DEMO_MOVING)
    cases = [("CLEAR", None, None), ("CLEAR + URS", None, "urs"), ("PPIR(MPC)", "mpc", None),
             ("PPIR(MPC) + URS", "mpc", "urs")]
    results, rows = {}, []
    for name, secure, sampling in cases:
        run = party_cli.register_processes if processes and secure else register
        r = run(fixed, moving, transform="rigid", secure=secure, sampling=sampling,
                max_iterations=100 if sampling is None else 30)
        name += ", 3 processes" if processes and secure else ""
        results[(secure, sampling)] = r
        ref = results[(None, sampling)]
        its = max(r.iterations, 1)
        rows.append({
            "solution": name,
            "final_mse": r.final_loss,
            "iterations": r.iterations,
            "angle_deg": float(np.degrees(r.params[0])),
            "rmse_vs_clear_px": None if secure is None else displacement_rmse(r.matrix, ref.matrix, fixed.shape)["voxels"],
            "time_per_iteration_s": {p: t / its for p, t in r.time_s.items()},
            "mb_per_iteration": {p: b / 1e6 for p, b in r.bytes_per_iteration.items()},
            "offline_mb": {p: v["offline"] / 1e6 for p, v in r.bytes.items()},
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("Solution", "MSE", "Iter.", "Angle (deg)", "RMSE vs CLEAR (px)", "Time p1 (s/it)", "Time p2 (s/it)",
            "MB p1/it", "MB p2/it")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        rmse = "-" if r["rmse_vs_clear_px"] is None else f"{r['rmse_vs_clear_px']:.2e}"
        lines.append(" | ".join([
            r["solution"], f"{r['final_mse']:.3f}", str(r["iterations"]), f"{r['angle_deg']:.4f}", rmse,
            f"{r['time_per_iteration_s']['party1']:.4f}", f"{r['time_per_iteration_s']['party2']:.4f}",
            f"{r['mb_per_iteration']['party1']:.4f}", f"{r['mb_per_iteration']['party2']:.6f}",
        ]))
    return "\n".join(lines)


def _run_demo(args) -> int:
    print(f"ppreg demo: rigid SSD registration, fixed {DEMO_FIXED}, moving {DEMO_MOVING} (bundled ITK slices)")
    print("Known answer: 10 degree rotation about (x, y) = (110.5, 128.5), then translation (13, 16) px; "
          "ppreg reports angles in (row, col) index order, where it reads -10 degrees.")
    rows = demo_rows(processes=args.processes)
    print(format_table(rows))
    print("Times include JIT compilation of each pipeline (steady-state timings: bench/bench_affine.py).")
    if args.processes:
        print("3 processes: time = each process's own compute; MB = the frames each process sent, as it "
              "counted them on its ZeroMQ/CURVE connections (loopback).")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


def enable_compilation_cache() -> Path | None:
    """Use JAX's persistent compilation cache so repeated commands skip most JIT compilation.

    The cache lives in ``$PPREG_CACHE_DIR`` or ``$XDG_CACHE_HOME/ppreg/jax`` (default
    ``~/.cache/ppreg/jax``); ``PPREG_COMPILATION_CACHE=0`` turns it off. Returns the directory
    used, or ``None``.
    """
    if os.environ.get("PPREG_COMPILATION_CACHE", "1") == "0":
        return None
    import jax

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = Path(os.environ.get("PPREG_CACHE_DIR", base / "ppreg" / "jax"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return cache


def main(argv=None) -> int:
    """Entry point of the ``ppreg`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    enable_compilation_cache()
    try:
        if args.command == "register":
            return _run_register(args)
        if args.command == "apply":
            return _run_apply(args)
        if args.command == "keygen":
            return party_cli.run_keygen(args, CLIError)
        if args.command == "party":
            return party_cli.run_party(args, CLIError, _load, write_outputs)
        if args.command == "train":
            return train_cli.run_train(args, CLIError)
        if args.command == "batch":
            return batch_cli.run_batch(args, CLIError, _load, write_outputs)
        return _run_demo(args)
    except CLIError as exc:
        print(f"ppreg: error: {exc}", file=sys.stderr)
        return 2
    except party_cli.SessionError as exc:
        print(f"ppreg: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
