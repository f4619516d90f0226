"""Validation suite for the deformable defaults (issue 15, "Defaults chosen on unseen cases").

Families of known-answer 3D cases at 2 mm, all made from the bundled Colin27 T1 and its AAL labels
(``colin27_t1_2mm``, ``colin27_aal_2mm``) by ``bench_svf.deformed_case``: a velocity ``v`` is
rescaled so that the largest displacement of ``exp(v)`` inside the brain is ``max mm``, and

- ``moving clean``: the fixed image is Colin27 warped by ``exp(v)`` (``u_true = exp(v)``);
- ``fixed clean``: the moving image is Colin27 warped by ``exp(v)`` (``u_true = exp(-v)``).

Velocity generators (voxels of 2 mm), each at two smoothness / size settings (:data:`SETTINGS`):

- ``noise``: white noise smoothed by a Gaussian (``ppreg.learned.synth.random_velocity``);
- ``bspline``: cubic B-spline with standard normal coefficients (``bench_svf.bspline_velocity``).

Every setting with both clean sides gives 8 families. Seeds :data:`TUNING_SEEDS` are the tuning
part (defaults were chosen on them only); seeds :data:`HELD_OUT_SEEDS` are the held-out part,
the only one reported against the targets, and :data:`FRESH_SEEDS` (``--split fresh``) a second
held-out part for a choice that was revisited after the first one had been seen. Family ``f`` and
seed ``s`` draw ``v`` from ``jax.random.fold_in(jax.random.key(s), setting index)``, so the two clean
sides of a setting share their velocities.

Per case and method the script records the mean AAL Dice (moving labels warped by nearest
neighbour, against the fixed labels), the displacement RMSE against ``u_true`` in mm over the
clean image's brain mask, the folding voxels (``det J <= 0``) and the registration time in this
process (the first call of a method includes its compilation). ``--peers`` adds the installed
peers of ``bench/peers.py`` (ANTs SyN (CC), dipy SyN (CC)) scored the same way.

``--real`` runs the real inter-subject pair: fixed MNI152 2009a T1 (``mni152_t1_2mm``), moving
Colin27 put on the MNI grid through world coordinates (as ``bench_intersubject.make_pair``), each
svf/dense method as its ``affine+`` pipeline. Scores: Dice of grey and white matter between MNI's
tissue labels (``mni152_tissue_2mm``, from the template's GM/WM probability maps) and Colin27's
tissue classes (:func:`tissue_classes`: 3-class intensity k-means inside the brain) warped by
nearest neighbour, and the local NCC (ANTs CC, window 5, higher is better).

``--resolution 1`` makes the same families at 1 mm from the originals of ``../shared/data/colin27``
(``ch2bet``, ``aal``; 181x217x181, cropped to the brain's bounding box plus 6 voxels; not bundled, so
the option needs the repository's shared data): the generators' smoothness is doubled in voxels so that
it is the same in mm, the largest displacement is the same in mm, and the family names end in
``(1 mm)``. No default was tuned at 1 mm: every 1 mm case is held out.

``--cold`` times the whole ``ppreg register`` command of each ppreg method on the first held-out
case of the first family, with an empty JAX compilation cache (``PPREG_CACHE_DIR`` set to a new
folder): process start, imports, compilation, registration and writing the outputs, as wall and CPU
(user + system) seconds of the child process.

Rows are appended to ``--out`` (JSON, written atomically after each row) and a rerun skips the rows
already there, so a partial run is not lost. ``--summary`` prints mean and worst case per family,
split and method from that file and writes them into it.

Usage:
    python bench/bench_validation.py [--quick] [--split held-out|tuning] [--resolution 2|1] [--methods NAME ...]
        [--variant NAME=JSON ...] [--peers [NAME ...]] [--real] [--cold]
        [--out bench/results/bench_validation.json]
    python bench/bench_validation.py --summary [--merge OTHER.json ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppreg import register
from ppreg.data import load_sample
from ppreg.grid import identity_grid
from ppreg.image import Image, resample_like, save
from ppreg.learned.synth import random_velocity
from ppreg.losses import lncc
from ppreg.metrics import dice, folding
from ppreg.warp import interpolate_nearest

from bench_svf import SPACING_MM, bspline_velocity, deformed_case, score
from common import fmt, print_header, write_results
from peers import PEERS, available

# setting -> (generator, smoothness in voxels: noise sigma or B-spline control spacing, max displacement mm)
SETTINGS = {
    "noise s4 5mm": ("noise", 4, 5.0),
    "noise s8 10mm": ("noise", 8, 10.0),
    "bspline c8 6mm": ("bspline", 8, 6.0),
    "bspline c16 10mm": ("bspline", 16, 10.0),
}
CLEAN = ("moving", "fixed")
FAMILIES = tuple(f"{s} / {c} clean" for s in SETTINGS for c in CLEAN)
TUNING_SEEDS = (0, 1)
HELD_OUT_SEEDS = (100, 101, 102, 103, 104)
# a second held-out part, first run on 2026-12-06 after the dense default was revisited with seeds 100-104 in view
# (DESIGN.md item 38): the only cases that choice has not seen
FRESH_SEEDS = (105, 106, 107, 108, 109)
SPLITS = {"tuning": TUNING_SEEDS, "held-out": HELD_OUT_SEEDS, "fresh": FRESH_SEEDS}

# ppreg methods: name -> register() keyword arguments (defaults unless stated). "svf lncc" is the one-sided
# update (the svf lncc default until DESIGN.md item 33), "svf lncc sym" the half-way one (the default since)
METHODS = {
    "svf lncc": {"transform": "svf", "loss": "lncc", "symmetric": False},
    "svf lncc sym": {"transform": "svf", "loss": "lncc", "symmetric": True},
    "svf ssd": {"transform": "svf", "loss": "ssd"},
    "dense lncc": {"transform": "dense", "loss": "lncc"},
}
ALL = "all synthetic families"  # summary rows over every case of a split
TISSUES = {"GM": 2, "WM": 3}  # labels of mni152_tissue_2mm (1: CSF / other brain)


SHARED_COLIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "colin27")
ONE_MM = " (1 mm)"  # family-name suffix of the 1 mm cases


def velocity(setting: str, seed: int, shape, spacing_mm: float = SPACING_MM) -> jnp.ndarray:
    """The un-scaled velocity ``(*shape, 3)`` of a setting and seed (voxels; the smoothness is set for
    2 mm voxels and scaled to ``spacing_mm`` so that it is the same in mm)."""
    kind, smooth, _ = SETTINGS[setting]
    key = jax.random.fold_in(jax.random.key(seed), list(SETTINGS).index(setting))
    smooth = smooth * SPACING_MM / spacing_mm
    if kind == "noise":
        return random_velocity(key, shape, sigma=float(smooth), max_norm=1.0)
    return bspline_velocity(key, shape, int(round(smooth)))


def colin27(resolution: int):
    """Colin27's skull-stripped T1 and AAL labels at ``resolution`` mm: the bundled 2 mm samples, or the
    1 mm originals of ``../shared/data/colin27`` (``ch2bet``, ``aal``) cropped to the brain's bounding box
    plus 6 voxels (FileNotFoundError when that folder is absent: 1 mm data is not bundled)."""
    if resolution == 2:
        return (jnp.asarray(load_sample("colin27_t1_2mm").data),
                jnp.asarray(load_sample("colin27_aal_2mm").data).astype(jnp.int32))
    import nibabel as nib

    paths = [os.path.join(SHARED_COLIN, n) for n in ("ch2bet.nii.gz", "aal.nii.gz")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"the 1 mm cases need {missing} (../shared/data of the repository)")
    image, labels = (np.asarray(nib.load(p).get_fdata(), np.float32) for p in paths)
    nz = np.nonzero(image > 0)
    box = tuple(slice(max(int(a.min()) - 6, 0), int(a.max()) + 7) for a in nz)
    return jnp.asarray(image[box]), jnp.asarray(labels[box]).astype(jnp.int32)


def make_case(family: str, seed: int, resolution: int = 2):
    """(fixed, moving, fixed_labels, moving_labels, u_true, brain) of one family and seed at ``resolution`` mm."""
    setting, clean = family.split(" / ")
    image, labels = colin27(resolution)
    return deformed_case(image, labels, velocity(setting, seed, image.shape, resolution), SETTINGS[setting][2],
                         clean=clean.split()[0], spacing_mm=float(resolution))


def tissue_classes(image: np.ndarray, *, iterations: int = 20) -> np.ndarray:
    """Three intensity classes inside the brain of a skull-stripped T1: 1 CSF, 2 GM, 3 WM (0 outside).

    One-dimensional k-means (Lloyd's algorithm) on the voxels with ``image > 0``, started at the
    20th, 50th and 80th percentiles; classes are numbered by increasing mean intensity (T1: CSF <
    GM < WM), the numbering of ``mni152_tissue_2mm``.

    Args:
        image: ``(*spatial)`` float array, background exactly 0.
        iterations: Lloyd iterations.

    Returns:
        int32 array of ``image``'s shape.

    Raises:
        ValueError: when fewer than 3 brain voxels are given.
    """
    values = image[image > 0].astype(np.float64)
    if values.size < 3:
        raise ValueError(f"need at least 3 brain voxels (image > 0) for 3 classes, got {values.size}")
    centres = np.percentile(values, [20, 50, 80])
    for _ in range(iterations):
        assign = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        centres = np.array([values[assign == k].mean() if np.any(assign == k) else centres[k] for k in range(3)])
    order = np.argsort(np.argsort(centres))  # rank of each centre
    out = np.zeros(image.shape, np.int32)
    out[image > 0] = order[np.argmin(np.abs(values[:, None] - centres[None]), axis=1)] + 1
    return out


def make_real_pair():
    """(fixed MNI152 T1, moving Colin27 T1 on the MNI grid, MNI tissue labels, Colin27 tissue classes on the MNI grid)."""
    fixed = load_sample("mni152_t1_2mm")
    colin = load_sample("colin27_t1_2mm")
    moving = resample_like(colin, fixed)
    colin_tissue = Image(tissue_classes(np.asarray(colin.data)).astype(np.float32), colin.affine)
    moving_tissue = resample_like(colin_tissue, fixed, order=0)
    fixed_tissue = load_sample("mni152_tissue_2mm")
    return (np.asarray(fixed.data), np.asarray(moving.data), np.rint(fixed_tissue.data).astype(np.int32),
            np.rint(moving_tissue.data).astype(np.int32))


def score_real(pair, u, warped) -> dict:
    """GM and WM Dice and local NCC of a displacement ``u`` (voxels, fixed grid) and warped image."""
    fixed, moving, fixed_tissue, moving_tissue = pair
    warped_tissue = np.asarray(interpolate_nearest(jnp.asarray(moving_tissue), identity_grid(fixed.shape) + u))
    per = dice(fixed_tissue, warped_tissue, labels=list(TISSUES.values()))
    before = dice(fixed_tissue, moving_tissue, labels=list(TISSUES.values()))
    out = {f"dice_{n}": float(per[v]) for n, v in TISSUES.items()}
    out.update({f"dice_{n}_before": float(before[v]) for n, v in TISSUES.items()})
    out["dice_after"] = float(np.mean([per[v] for v in TISSUES.values()]))
    out["dice_before"] = float(np.mean([before[v] for v in TISSUES.values()]))
    out["lncc_before"] = -float(lncc(jnp.asarray(fixed), jnp.asarray(moving)))
    out["lncc_after"] = -float(lncc(jnp.asarray(fixed), jnp.asarray(warped)))
    out["folding_voxels"] = folding(u)["voxels"]
    return out


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_method(case, kwargs: dict, spacing_mm: float = SPACING_MM) -> dict:
    r, seconds = _timed(lambda: register(case[0], case[1], **kwargs))
    return {**score(case, r.displacement(), spacing_mm), "time_s": seconds}


def run_real(pair, kwargs: dict) -> dict:
    kwargs = dict(kwargs, transform="affine+" + kwargs["transform"])
    r, seconds = _timed(lambda: register(pair[0], pair[1], **kwargs))
    return {**score_real(pair, r.displacement(), np.asarray(r.warped)), "time_s": seconds}


def cold_command(case, kwargs: dict, workdir: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``ppreg register fixed moving -o out ...`` with an empty
    compilation cache. On a loaded machine the CPU seconds are the steadier figure: on an idle machine with
    ``c`` cores the wall time lies between ``cpu / c`` and ``cpu``."""
    affine = np.diag([SPACING_MM] * 3 + [1.0])
    paths = [os.path.join(workdir, n) for n in ("fixed.nii.gz", "moving.nii.gz")]
    for path, data in zip(paths, case[:2]):
        if not os.path.exists(path):
            save(Image(np.asarray(data, np.float32), affine), path)
    flags = []
    for k, v in kwargs.items():
        if isinstance(v, bool):
            flags.append("--" + ("" if v else "no-") + k.replace("_", "-"))
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    out = tempfile.mkdtemp(dir=workdir)
    env = dict(os.environ, PPREG_CACHE_DIR=tempfile.mkdtemp(dir=workdir))
    cmd = [os.path.join(os.path.dirname(sys.executable), "ppreg"), "register", *paths, "-o", out, *flags]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def summarise(rows) -> list[dict]:
    """Mean and worst case per (family, split, method), and per (split, method) over every synthetic case
    (:data:`ALL`): Dice (worst = min), RMSE (worst = max), folding, median time."""
    groups = {}
    for row in rows:
        if row.get("kind") in ("case", "real"):
            groups.setdefault((row["family"], row["split"], row["method"]), []).append(row)
        if row.get("kind") == "case":  # every synthetic case of the split (and resolution) together
            suffix = ONE_MM if row["family"].endswith(ONE_MM) else ""
            groups.setdefault((ALL + suffix, row["split"], row["method"]), []).append(row)
    out = []
    for (family, split, method), rs in groups.items():
        d = [r["dice_after"] for r in rs]
        e = [r["rmse_after_mm"] for r in rs if "rmse_after_mm" in r]
        out.append({"family": family, "split": split, "method": method, "n": len(rs),
                    "dice_before": float(np.mean([r["dice_before"] for r in rs])),
                    "dice_mean": float(np.mean(d)), "dice_worst": float(np.min(d)),
                    "rmse_mean_mm": float(np.mean(e)) if e else None, "rmse_worst_mm": float(np.max(e)) if e else None,
                    "folding_max": int(max(r["folding_voxels"] for r in rs)),
                    "lncc_mean": float(np.mean([r["lncc_after"] for r in rs])) if "lncc_after" in rs[0] else None,
                    "time_median_s": float(np.median([r["time_s"] for r in rs]))})
    order = {f: i for i, f in enumerate(FAMILIES + (ALL, "Colin27 -> MNI152"))}
    return sorted(out, key=lambda s: (s["split"], order.get(s["family"], 99), s["method"]))


SUMMARY_COLUMNS = ("split", "family", "method", "n", "Dice before", "Dice mean", "Dice worst", "RMSE mean mm",
                   "RMSE worst mm", "local NCC", "folding max", "time s (median)")


def print_summary(summary) -> None:
    print_header(SUMMARY_COLUMNS)
    for s in summary:
        print(" | ".join([s["split"], s["family"], s["method"], str(s["n"]), f"{s['dice_before']:.3f}",
                          f"{s['dice_mean']:.3f}", f"{s['dice_worst']:.3f}", fmt(s["rmse_mean_mm"], ".2f"),
                          fmt(s["rmse_worst_mm"], ".2f"), fmt(s["lncc_mean"], ".4f"), str(s["folding_max"]),
                          f"{s['time_median_s']:.1f}"]))


def _variant(text: str):
    name, _, spec = text.partition("=")
    try:
        kwargs = json.loads(spec)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=JSON, got {text!r}: {e}") from None
    if not name or not isinstance(kwargs, dict) or "transform" not in kwargs:
        raise argparse.ArgumentTypeError(f"--variant wants NAME={{\"transform\": ..., ...}}, got {text!r}")
    return name, kwargs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=list(SPLITS), default="held-out")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES,
                    help="families to run (none: only --real / --cold)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override the split's seeds")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help=f"ppreg methods of {list(METHODS)}")
    ap.add_argument("--variant", type=_variant, action="append", default=[],
                    help='extra ppreg method NAME=JSON of register() keywords, e.g. \'svf lncc sym={"transform": '
                         '"svf", "loss": "lncc", "symmetric": true}\'')
    ap.add_argument("--peers", nargs="*", default=None, choices=list(PEERS),
                    help="also run these installed peers (no names: ANTs SyN (CC) and dipy SyN (CC))")
    ap.add_argument("--quick", action="store_true", help="one seed per family")
    ap.add_argument("--resolution", type=int, choices=(2, 1), default=2,
                    help="mm: 2 (bundled Colin27) or 1 (the originals in ../shared/data; families named '... (1 mm)')")
    ap.add_argument("--real", action="store_true", help="also the Colin27 -> MNI152 pair (ppreg methods)")
    ap.add_argument("--cold", action="store_true", help="time the whole cold ppreg command of each method")
    ap.add_argument("--summary", action="store_true", help="only print and store the summary of --out")
    ap.add_argument("--out", default="bench/results/bench_validation.json")
    ap.add_argument("--merge", nargs="+", default=[],
                    help="with --summary: also take the rows of these result files (runs made in parallel)")
    args = ap.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; expected names of {list(METHODS)} (or use --variant)")
    methods = {**{m: METHODS[m] for m in args.methods}, **dict(args.variant)}
    peers = {} if args.peers is None else available(args.peers or ["ANTs SyN (CC)", "dipy SyN (CC)"])
    rows = json.load(open(args.out))["rows"] if os.path.exists(args.out) else []
    done = {(r["kind"], r["family"], r["seed"], r["method"]) for r in rows}

    def add(row):
        rows.append(row)
        summary = summarise(rows)
        write_results(args.out, {"rows": rows, "summary": summary}, tuning_seeds=TUNING_SEEDS,
                      held_out_seeds=HELD_OUT_SEEDS, methods=methods)

    if not args.summary:
        seeds = args.seeds or SPLITS[args.split][:1 if args.quick else None]
        split = next((name for name, part in SPLITS.items() if set(seeds) <= set(part)), "held-out")
        print_header(("kind", "family", "seed", "method", "Dice before", "Dice after", "RMSE mm", "folding", "time s"))
        for seed in seeds:
            for generator in args.families:
                family = generator + (ONE_MM if args.resolution == 1 else "")
                todo = [m for m in list(methods) + list(peers) if ("case", family, seed, m) not in done]
                if not todo:
                    continue
                case = make_case(generator, seed, args.resolution)
                for m in todo:
                    result = run_method(case, methods[m], args.resolution) if m in methods else None
                    if result is None:
                        u, seconds = peers[m](case[0], case[1])
                        result = {**score(case, u, args.resolution), "time_s": seconds}
                    add({"kind": "case", "family": family, "split": split, "seed": seed, "method": m,
                         "resolution_mm": args.resolution, "kwargs": methods.get(m), **result})
                    print(" | ".join(["case", family, str(seed), m, f"{result['dice_before']:.3f}",
                                      f"{result['dice_after']:.3f}", f"{result['rmse_after_mm']:.2f}",
                                      str(result["folding_voxels"]), f"{result['time_s']:.1f}"]), flush=True)
        if args.real:
            pair = make_real_pair()
            for m, kwargs in methods.items():
                if ("real", "Colin27 -> MNI152", 0, m) in done:
                    continue
                result = run_real(pair, kwargs)
                add({"kind": "real", "family": "Colin27 -> MNI152", "split": "held-out", "seed": 0, "method": m,
                     "kwargs": kwargs, **result})
                print(" | ".join(["real", "Colin27 -> MNI152", "0", m, f"{result['dice_before']:.3f}",
                                  f"{result['dice_after']:.3f}", f"lncc {result['lncc_after']:.4f}",
                                  str(result["folding_voxels"]), f"{result['time_s']:.1f}"]), flush=True)
        if args.cold:
            case = make_case(FAMILIES[0], HELD_OUT_SEEDS[0])
            with tempfile.TemporaryDirectory() as workdir:
                for m, kwargs in methods.items():
                    seconds, cpu = cold_command(case, kwargs, workdir)
                    add({"kind": "cold", "family": FAMILIES[0], "split": "held-out", "seed": HELD_OUT_SEEDS[0],
                         "method": m, "kwargs": kwargs, "time_s": seconds, "cpu_s": cpu, "load": os.getloadavg()[0]})
                    print(f"cold command | {m} | {seconds:.1f} s wall, {cpu:.1f} s CPU (load "
                          f"{os.getloadavg()[0]:.1f})", flush=True)
    for path in args.merge if args.summary else ():
        rows += [r for r in json.load(open(path))["rows"] if (r["kind"], r["family"], r["seed"], r["method"]) not in done]
    summary = summarise(rows)
    print_summary(summary)
    write_results(args.out, {"rows": rows, "summary": summary}, tuning_seeds=TUNING_SEEDS,
                  held_out_seeds=HELD_OUT_SEEDS)


if __name__ == "__main__":
    main()
