"""SVF with the ANTs local cross-correlation (CC), CLEAR vs PPIR(MPC): the CC rows of Taiello et al. 2024.

Cases (bundled real data):
  * 2D: ITK PD Border20 (fixed) vs PD BSplined10 (moving), crop [40:140, 40:140] (100 x 100).
  * 3D: a centred ``size``^3 crop of Colin27 T1 at 2 mm (fixed) vs the same crop warped by a
    known smooth displacement (a sum of two sine modes per axis, up to ~1.6 voxels).

Both solutions run the same coarse-to-fine loop (:func:`ppreg.register._fit_svf`'s: levels
(2, 1), the velocity carried in full-resolution voxels and upsampled between levels) on the
same loss, :func:`ppreg.secure.lcc.guarded_lncc` (window 5, floor 0.1): CLEAR with
:func:`ppreg.optim.run_svf_level` (jitted), MPC with :func:`ppreg.secure.lcc.run_svf_level`
(both parties and the dealer in this process, real frames on a measured channel).

Columns: final loss (clear guarded lncc of the final warp, evaluation only) and MSE, total
iterations, displacement RMSE of MPC vs CLEAR (voxels, full resolution), time per iteration
per party (MPC: each party's own compute, see :func:`ppreg.secure.lcc.run_svf_level`; CLEAR:
the whole loop, party1), online MB each party sent per iteration (average over both levels),
bytes per voxel per iteration at full resolution (party1), offline MB received from the dealer
(whole run). A short warm-up run compiles first, so times are steady state.

Usage: python bench/bench_ppir_cc.py [--out bench/results/bench_ppir_cc.json] [--size 24] [--iterations 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppreg import optim
from ppreg.data import load_sample
from ppreg.grid import downsample, identity_grid, level_shape, upsample_field
from ppreg.register import SVF_STEPS, _unit_range
from ppreg.secure import lcc
from ppreg.secure.shares import TwoPartySession
from ppreg.svf import exp as svf_exp
from ppreg.warp import warp

from common import fmt, print_header, write_results

LEVELS = (2, 1)
OPTS = dict(step=0.5, sigma_fluid=2.0, sigma_diff=0.5, steps=SVF_STEPS)


def cases(size: int):
    """``(name, fixed, moving)`` float32 images scaled into [0, 1]."""
    fixed2 = load_sample("BrainProtonDensitySliceBorder20").data[40:140, 40:140]
    moving2 = load_sample("BrainProtonDensitySliceBSplined10").data[40:140, 40:140]
    yield "2D ITK 100x100", _unit_range(jnp.asarray(fixed2)), _unit_range(jnp.asarray(moving2))
    vol = np.asarray(load_sample("colin27_t1_2mm").data)
    lo = [(n - size) // 2 for n in vol.shape]
    crop = _unit_range(jnp.asarray(vol[tuple(slice(a, a + size) for a in lo)]))
    x = identity_grid(crop.shape) / size  # (size, size, size, 3) in [0, 1)
    t = jnp.stack([1.2 * jnp.sin(2 * jnp.pi * x[..., (i + 1) % 3]) + 0.4 * jnp.cos(2 * jnp.pi * x[..., (i + 2) % 3])
                   for i in range(3)], axis=-1)
    yield f"3D Colin27 {size}^3", crop, warp(crop, identity_grid(crop.shape) + t)


def fit(fixed, moving, iterations: int, session=None):
    """The coarse-to-fine loop of ``register._fit_svf`` for both solutions; returns
    ``(displacement, iterations, seconds per party, party1 bytes per voxel per iteration at
    full resolution)``."""
    velocity, seconds, its, per_voxel = None, {"party1": 0.0, "party2": 0.0}, 0, None
    for li, factor in enumerate(LEVELS):
        coarse = level_shape(fixed.shape, factor)
        velocity = (jnp.zeros(coarse + (fixed.ndim,), jnp.float32) if velocity is None
                    else upsample_field(velocity, fixed.shape, LEVELS[li - 1], factor))
        m, f = downsample(moving, factor), downsample(fixed, factor)
        before = None if session is None else session.channel.traffic.snapshot()["sent"]["party1"]["online"]
        start = time.perf_counter()
        if session is None:
            v, _ = optim.run_svf_level(velocity / factor, m, f, loss_fn=lcc.GuardedLoss(), iterations=iterations,
                                       **OPTS)
            jax.block_until_ready(v)
            seconds["party1"] += time.perf_counter() - start
        else:
            v, _, per_it = lcc.run_svf_level(session, velocity / factor, m, f, iterations=iterations,
                                             label=f"L{li}", **OPTS)
            for p in seconds:
                seconds[p] += per_it[p] * iterations
            sent = session.channel.traffic.snapshot()["sent"]["party1"]["online"] - before
            per_voxel = sent / iterations / int(np.prod(coarse))
        velocity = v * factor
        its += iterations
    return svf_exp(velocity, steps=SVF_STEPS), its, seconds, per_voxel


def _summary(fixed, moving, u):
    warped = warp(moving, identity_grid(fixed.shape) + u)
    return float(lcc.guarded_lncc(fixed, warped)), float(jnp.mean((warped - fixed) ** 2))


def cc_rows(size: int = 24, iterations: int = 20, verbose: bool = False) -> list[dict]:
    """Rows in the table format of ``bench/bench_affine.py`` (plus ``bytes_per_voxel``), one
    CLEAR and one PPIR(MPC) row per case."""
    rows = []
    for name, fixed, moving in cases(size):
        fit(fixed, moving, iterations)  # compile (the clear loop's iteration count is static)
        fit(fixed, moving, 2, TwoPartySession())  # the MPC loop compiles per shape
        u_clear, its, sec, _ = fit(fixed, moving, iterations)
        session = TwoPartySession()
        u_mpc, _, sec_mpc, per_voxel = fit(fixed, moving, iterations, session)
        snap = session.channel.traffic.snapshot()
        for solution, u, s in (("CLEAR", u_clear, sec), ("PPIR(MPC)", u_mpc, sec_mpc)):
            secure = solution != "CLEAR"
            loss, mse = _summary(fixed, moving, u)
            row = {
                "case": name, "shape": list(fixed.shape), "transform": "svf", "loss": "lncc (guarded)",
                "solution": solution, "iterations": its, "final_loss": loss, "final_mse": mse,
                "rmse_vs_clear_px": float(jnp.sqrt(jnp.mean(jnp.sum((u - u_clear) ** 2, -1)))) if secure else None,
                "time_per_iteration_s": {p: t / its for p, t in s.items()},
                "mb_per_iteration": {p: (snap["sent"][p]["online"] / its / 1e6 if secure else 0.0)
                                     for p in ("party1", "party2")},
                "bytes_per_voxel": per_voxel if secure else None,
                "offline_mb": {p: (snap["received"][p]["offline"] / 1e6 if secure else 0.0)
                               for p in ("party1", "party2")},
            }
            rows.append(row)
            if verbose:
                print_row(row, header=len(rows) == 1)
    return rows


COLUMNS = ("case", "solution", "iter", "loss", "MSE", "RMSE vs CLEAR px", "p1 s/it", "p2 s/it", "p1 MB/it",
           "p2 MB/it", "B/voxel", "offline MB p2")


def print_row(row, header=False):
    if header:
        print_header(COLUMNS)
    print(" | ".join([
        row["case"], row["solution"], str(row["iterations"]), f"{row['final_loss']:.4f}", f"{row['final_mse']:.5f}",
        fmt(row["rmse_vs_clear_px"], ".2e"), f"{row['time_per_iteration_s']['party1']:.4f}",
        f"{row['time_per_iteration_s']['party2']:.4f}", f"{row['mb_per_iteration']['party1']:.3f}",
        f"{row['mb_per_iteration']['party2']:.3f}", fmt(row["bytes_per_voxel"], ".0f"),
        f"{row['offline_mb']['party2']:.2f}",
    ]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/bench_ppir_cc.json")
    ap.add_argument("--size", type=int, default=24, help="side of the 3D Colin27 crop (voxels)")
    ap.add_argument("--iterations", type=int, default=20, help="iterations per level")
    args = ap.parse_args()
    rows = cc_rows(args.size, args.iterations, verbose=True)
    write_results(args.out, {"rows": rows}, levels=list(LEVELS), iterations_per_level=args.iterations,
                  window=lcc.WINDOW, floor=lcc.FLOOR, frac_bits=lcc.FRAC_BITS)


if __name__ == "__main__":
    main()
