"""Pairs per second, 3D Colin27 at 2 mm: one pair at a time vs ``register_batch`` on one device and on two
(host-platform) devices, beside ANTs and FireANTs on the same pairs.

Pairs (seeds from 100: none of them was used to tune a default):
- ``affine``: the fixed image is Colin27 (91 x 109 x 91, 2 mm, bundled) under a random affine about the
  image centre (rotations up to 5 degrees per axis, scales 1 +- 4 %, shifts up to 4 mm); ppreg runs
  ``transform="affine"`` (SSD Gauss-Newton, defaults);
- ``svf``: the fixed image is Colin27 under a random smooth diffeomorphism (``bench_svf.make_case``: a cubic
  B-spline velocity, 6 mm largest displacement in the brain); ppreg runs ``transform="svf", loss="lncc"``
  (defaults).

Rows per family:
- ``ppreg register (batch 1)``: ``register()`` pair after pair (after one warm-up call: compile excluded);
- ``ppreg register_batch (1 device)``: all pairs in one call (second call; the first call's extra time is
  the compile column);
- ``ppreg register_batch (2 host devices)``: the same in a child process with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (the batch sharded over two CPU devices that share
  the same cores);
- ``ANTs`` (antspyx: ``Affine``, or ``SyNOnly`` with CC as in ``bench/peers.py``) and ``FireANTs``
  (``AffineRegistration``, or ``GreedyRegistration`` with CC, scales 4,2,1 and iterations 200,100,50 as in its
  README, on the CPU with torch), pair after pair, when installed.

Each row gives pairs/s, s/pair, and the accuracy against the known transform over the pairs: mean AAL Dice
after registration (mean and worst pair) and displacement RMSE in mm over the brain (mean and worst). FireANTs'
published anchor is 0.2-0.7 s per pair on one GPU (Jena et al. 2024, FireANTs); this machine has none.

Usage: python bench/bench_batch.py [--pairs 8 4] [--families affine svf] [--peers] [--peer-pairs 2]
       [--out bench/results/bench_batch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_svf import SPACING_MM, make_case, score  # noqa: E402
from common import fmt, print_header, write_results  # noqa: E402
from peers import ants_syn, ants_syn_cc  # noqa: E402
from ppreg import register, register_batch  # noqa: E402
from ppreg.data import load_sample  # noqa: E402
from ppreg.grid import identity_grid  # noqa: E402
from ppreg.transforms import apply_matrix  # noqa: E402
from ppreg.warp import interpolate_nearest, warp  # noqa: E402

OPTIONS = {"affine": dict(transform="affine"), "svf": dict(transform="svf", loss="lncc")}
SEED0 = 100
ANCHOR = "FireANTs: 0.2-0.7 s per pair on one GPU (published)"


def _rotation(angles):
    out = np.eye(3)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        out = out @ r
    return out


def affine_case(seed: int):
    """(fixed, moving, fixed_labels, moving_labels, u_true, brain) under a random affine (module docstring)."""
    rng = np.random.default_rng(seed)
    moving = jnp.asarray(load_sample("colin27_t1_2mm").data)
    labels = jnp.asarray(load_sample("colin27_aal_2mm").data).astype(jnp.int32)
    shape = moving.shape
    lin = _rotation(np.deg2rad(rng.uniform(-5, 5, 3))) @ np.diag(rng.uniform(0.96, 1.04, 3))
    c = (np.asarray(shape) - 1) / 2.0
    mat = np.eye(4)
    mat[:3, :3] = lin
    mat[:3, 3] = c - lin @ c + rng.uniform(-4, 4, 3) / SPACING_MM  # fixed index -> moving index
    pts = apply_matrix(jnp.asarray(mat, jnp.float32), identity_grid(shape))
    u_true = np.asarray(pts - identity_grid(shape))
    fixed, fixed_labels = np.asarray(warp(moving, pts)), np.asarray(interpolate_nearest(labels, pts))
    return fixed, np.asarray(moving), fixed_labels, np.asarray(labels), u_true, fixed_labels > 0


def make_cases(family: str, n: int):
    return [affine_case(SEED0 + i) if family == "affine" else make_case(SEED0 + i) for i in range(n)]


def summarize(name, family, n, seconds, scores, compile_s=None, note=""):
    dice = [s["dice_after"] for s in scores]
    rmse = [s["rmse_after_mm"] for s in scores]
    return {"family": family, "method": name, "pairs": n, "seconds": seconds, "pairs_per_s": n / seconds,
            "s_per_pair": seconds / n, "compile_s": compile_s, "dice_mean": float(np.mean(dice)),
            "dice_worst": float(np.min(dice)), "rmse_mm_mean": float(np.mean(rmse)),
            "rmse_mm_worst": float(np.max(rmse)), "folding_max": int(max(s["folding_voxels"] for s in scores)),
            "dice_before_mean": float(np.mean([s["dice_before"] for s in scores])), "note": note}


def run_single(family, cases):
    register(cases[0][0], cases[0][1], **OPTIONS[family])  # warm-up (compile)
    t0 = time.perf_counter()
    results = [register(c[0], c[1], **OPTIONS[family]) for c in cases]
    seconds = time.perf_counter() - t0
    return seconds, [score(c, r.displacement()) for c, r in zip(cases, results)]


def run_batched(family, cases):
    fixed, moving = [c[0] for c in cases], [c[1] for c in cases]
    t0 = time.perf_counter()
    register_batch(fixed, moving, **OPTIONS[family])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = register_batch(fixed, moving, **OPTIONS[family])
    seconds = time.perf_counter() - t0
    return seconds, max(first - seconds, 0.0), [score(c, r.displacement()) for c, r in zip(cases, results)]


def run_two_devices(family, n):
    """``run_batched`` in a child process with two host-platform devices; returns its JSON."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", family, str(n)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"two-device child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fireants_pair(fixed, moving, family):
    """FireANTs on the CPU (torch): ``(u in ppreg's convention, seconds)``. Its warped coordinates are
    ``grid_sample``'s normalised ``(x, y, z)`` of the moving image (align_corners); numpy axis k is the
    reversed component."""
    import SimpleITK as sitk
    import torch
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration

    f = BatchedImages([Image(sitk.GetImageFromArray(np.asarray(fixed, np.float32)), device="cpu")])
    m = BatchedImages([Image(sitk.GetImageFromArray(np.asarray(moving, np.float32)), device="cpu")])
    t0 = time.perf_counter()
    if family == "affine":
        reg = AffineRegistration([4, 2, 1], [200, 100, 50], f, m, loss_type="cc", progress_bar=False)
    else:
        reg = GreedyRegistration([4, 2, 1], [200, 100, 50], f, m, loss_type="cc", cc_kernel_size=5,
                                 progress_bar=False)
    reg.optimize()
    with torch.no_grad():
        coords = reg.get_warped_coordinates(f, m)[0].cpu().numpy()  # (*shape, 3) normalised x, y, z
    seconds = time.perf_counter() - t0
    shape = np.asarray(fixed.shape, np.float64)
    idx = (coords[..., ::-1] + 1.0) / 2.0 * (shape - 1)  # numpy axis order, voxel indices
    return (idx - np.asarray(identity_grid(fixed.shape))).astype(np.float32), seconds


def run_peer(name, family, cases, fn):
    us, seconds = zip(*[fn(c[0], c[1]) for c in cases])
    return summarize(name, family, len(cases), float(sum(seconds)), [score(c, u) for c, u in zip(cases, us)])


COLUMNS = ("family", "method", "pairs", "pairs/s", "s/pair", "compile s", "Dice mean", "Dice worst",
           "RMSE mm mean", "RMSE mm worst", "folding max")


def print_row(r, rows=None, out=None):
    """Print a table row; with ``rows`` and ``out``, also rewrite the JSON (so an interrupted run keeps its rows)."""
    if rows is not None:
        write_results(out, {"rows": rows, "anchor": ANCHOR}, devices=len(jax.devices()))
    print(" | ".join([r["family"], r["method"], str(r["pairs"]), fmt(r["pairs_per_s"], ".3f"),
                      fmt(r["s_per_pair"], ".2f"), fmt(r["compile_s"], ".1f"), fmt(r["dice_mean"], ".3f"),
                      fmt(r["dice_worst"], ".3f"), fmt(r["rmse_mm_mean"], ".2f"), fmt(r["rmse_mm_worst"], ".2f"),
                      str(r["folding_max"])]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["affine", "svf"], choices=list(OPTIONS))
    ap.add_argument("--pairs", type=int, nargs="+", default=[8, 4], help="pairs per family, in --families order")
    ap.add_argument("--peers", action="store_true", help="also run ANTs and FireANTs when installed")
    ap.add_argument("--peer-pairs", type=int, default=2,
                    help="pairs for ANTs and FireANTs (the first of the family's; slow on a CPU)")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/bench_batch.json")
    args = ap.parse_args()
    if args.child:  # the two-device run (module docstring)
        family, n = args.child[0], int(args.child[1])
        seconds, compile_s, scores = run_batched(family, make_cases(family, n))
        print(json.dumps(summarize(f"ppreg register_batch ({len(jax.devices())} host devices)", family, n, seconds,
                                   scores, compile_s)))
        return
    rows = []
    print_header(COLUMNS)
    for family, n in zip(args.families, args.pairs):
        cases = make_cases(family, n)
        seconds, scores = run_single(family, cases)
        rows.append(summarize("ppreg register (batch 1)", family, n, seconds, scores))
        print_row(rows[-1], rows, args.out)
        seconds, compile_s, scores = run_batched(family, cases)
        rows.append(summarize("ppreg register_batch (1 device)", family, n, seconds, scores, compile_s))
        print_row(rows[-1], rows, args.out)
        rows.append(run_two_devices(family, n))
        print_row(rows[-1], rows, args.out)
        if args.peers:
            import importlib.util

            if importlib.util.find_spec("ants") is not None:
                fn = (lambda f, m: ants_syn(f, m, transform="Affine")) if family == "affine" else ants_syn_cc
                rows.append(run_peer("ANTs " + ("Affine" if family == "affine" else "SyN (CC)"), family,
                                     cases[:args.peer_pairs], fn))
                print_row(rows[-1], rows, args.out)
            if importlib.util.find_spec("fireants") is not None:
                rows.append(run_peer("FireANTs (CPU) " + ("affine" if family == "affine" else "greedy (CC)"),
                                     family, cases[:args.peer_pairs], lambda f, m: fireants_pair(f, m, family)))
                print_row(rows[-1], rows, args.out)


if __name__ == "__main__":
    main()
