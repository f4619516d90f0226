"""Per-iteration time and traffic of linear SSD registration, CLEAR vs PPIR(MPC).

Cases (bundled real data):
  * 2D rigid and affine: ITK PD Border20 (fixed) vs R10X13Y17 (moving), 257 x 221.
  * 3D affine: Colin27 T1 at 2 mm (91 x 109 x 91) vs itself under a known affine
    (rotation ~6 deg, 4% scaling, 3-6 mm shifts), accuracy reported against the truth.

Each configuration runs twice: the first run's extra time is reported as compile time,
the second gives the steady-state time per Gauss-Newton iteration per party. Traffic is
measured on the channel (online bytes each party sent per iteration; offline = dealer
material received, whole run).

Usage: python bench/bench_affine.py [--out bench/results/bench_affine.json] [--quick]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from ppreg import register
from ppreg.data import load_sample
from ppreg.grid import identity_grid
from ppreg.metrics import displacement_rmse
from ppreg.transforms import apply_matrix, image_center, matrix
from ppreg.warp import warp

from common import fmt, print_header, timed_twice, write_results


def cases(quick: bool):
    fixed2 = load_sample("BrainProtonDensitySliceBorder20").data
    moving2 = load_sample("BrainProtonDensitySliceR10X13Y17").data
    yield "2D rigid", fixed2, moving2, "rigid", None, (4, 2, 1)
    if not quick:
        yield "2D affine", fixed2, moving2, "affine", None, (4, 2, 1)
    vol = jnp.asarray(load_sample("colin27_t1_2mm").data)
    center = image_center(vol.shape)
    params = jnp.asarray([0.04, 0.06, 0.0, -0.05, 0.02, 0.03, 0.01, -0.04, 0.03, 3.0, -4.0, 6.0], jnp.float32)
    truth = matrix("affine", params, center)
    moving3 = np.asarray(warp(vol, apply_matrix(jnp.linalg.inv(truth), identity_grid(vol.shape))))
    yield "3D affine", np.asarray(vol), moving3, "affine", np.asarray(truth), (4, 2, 1)


def run(fixed, moving, kind, levels, secure, sampling):
    kwargs = dict(transform=kind, secure=secure, sampling=sampling, levels=levels,
                  max_iterations=100 if sampling is None else 30)
    r, first, second = timed_twice(lambda: register(fixed, moving, **kwargs))
    return r, max(first - second, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/bench_affine.json")
    ap.add_argument("--quick", action="store_true", help="skip the 2D affine case")
    args = ap.parse_args()
    rows = []
    for name, fixed, moving, kind, truth, levels in cases(args.quick):
        ref = {}
        for secure, sampling in ((None, None), ("mpc", None), (None, "urs"), ("mpc", "urs")):
            r, compile_s = run(fixed, moving, kind, levels, secure, sampling)
            if secure is None:
                ref[sampling] = r
            its = max(r.iterations, 1)
            row = {
                "case": name, "shape": list(np.shape(fixed)), "transform": kind,
                "solution": ("PPIR(MPC)" if secure else "CLEAR") + (" + URS" if sampling else ""),
                "iterations": r.iterations, "final_mse": r.final_loss,
                "rmse_vs_clear_px": None if secure is None else
                displacement_rmse(r.matrix, ref[sampling].matrix, np.shape(fixed))["voxels"],
                "rmse_vs_truth_px": None if truth is None else displacement_rmse(r.matrix, truth, np.shape(fixed))["voxels"],
                "time_per_iteration_s": {p: t / its for p, t in r.time_s.items()},
                "compile_s": compile_s,
                "mb_per_iteration": {p: b / 1e6 for p, b in r.bytes_per_iteration.items()},
                "offline_mb": {p: v["offline"] / 1e6 for p, v in r.bytes.items()},
            }
            rows.append(row)
            print_row(row, header=len(rows) == 1)
    write_results(args.out, {"rows": rows})


COLUMNS = ("case", "solution", "iter", "MSE", "RMSE vs CLEAR px", "RMSE vs truth px", "p1 s/it", "p2 s/it",
           "compile s", "p1 MB/it", "p2 MB/it", "offline MB p2")


def print_row(row, header=False):
    if header:
        print_header(COLUMNS)
    print(" | ".join([
        row["case"], row["solution"], str(row["iterations"]), f"{row['final_mse']:.3f}",
        fmt(row["rmse_vs_clear_px"], ".2e"), fmt(row["rmse_vs_truth_px"], ".3f"),
        f"{row['time_per_iteration_s']['party1']:.4f}", f"{row['time_per_iteration_s']['party2']:.4f}",
        f"{row['compile_s']:.2f}", f"{row['mb_per_iteration']['party1']:.4f}",
        f"{row['mb_per_iteration']['party2']:.6f}", f"{row['offline_mb']['party2']:.2f}",
    ]), flush=True)


if __name__ == "__main__":
    main()
