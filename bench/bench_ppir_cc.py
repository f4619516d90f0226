"""SVF with the ANTs local cross-correlation (CC), CLEAR vs PPIR(MPC): the CC rows of Taiello et al. 2024.

Cases (bundled real data):
  * 2D: ITK PD Border20 (fixed) vs PD BSplined10 (moving), crop [40:140, 40:140] (100 x 100).
  * 3D: a centred ``size``^3 crop of Colin27 T1 at 2 mm (fixed) vs the same crop warped by a
    known smooth displacement (a sum of two sine modes per axis, up to ~1.6 voxels).

Both solutions run the same coarse-to-fine loop (:func:`ppreg.methods.fit_svf`'s: levels
(2, 1), the velocity carried in full-resolution voxels and upsampled between levels) on the
same loss, :func:`ppreg.secure.protocols.lcc.guarded_lncc` (window 5, floor 0.1): CLEAR with
:func:`ppreg.optim.run_svf_level` (jitted), MPC with :func:`ppreg.secure.protocols.lcc.run_svf_level`
(both parties and the dealer in this process, real frames on a measured channel).

Columns: final loss (clear guarded lncc of the final warp, evaluation only) and MSE, total
iterations, displacement RMSE of MPC vs CLEAR (voxels, full resolution), time per iteration
per party (MPC: each party's own compute, see :func:`ppreg.secure.protocols.lcc.run_svf_level`; CLEAR:
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
from ppreg.options import SVF_STEPS, unit_range
from ppreg.secure.protocols import lcc
from ppreg.secure.mpc.shares import TwoPartySession
from ppreg.svf import exp as svf_exp
from ppreg.warp import warp

from common import fmt, print_header, write_results

LEVELS = (2, 1)
PAPER_SCHEDULE = ((8, 10), (4, 10), (2, 5), (1, 1))  # pp_dipy's syn_cc_registration_3d: level_iters [10, 10, 5, 1]
FRAC_BITS = None  # --frac-bits (default: lcc.frac_bits_for each level)
OPTS = dict(step=0.5, sigma_fluid=2.0, sigma_diff=0.5, steps=SVF_STEPS)


def _known_warp(volume, amplitude: float = 1.0):
    """``volume`` warped by a smooth known displacement: two sine modes per axis, up to
    ``1.6 amplitude`` voxels."""
    x = identity_grid(volume.shape) / jnp.asarray(volume.shape, jnp.float32)  # in [0, 1)
    t = jnp.stack([1.2 * jnp.sin(2 * jnp.pi * x[..., (i + 1) % 3]) + 0.4 * jnp.cos(2 * jnp.pi * x[..., (i + 2) % 3])
                   for i in range(3)], axis=-1)
    return warp(volume, identity_grid(volume.shape) + amplitude * t)


def cases(size: int):
    """``(name, fixed, moving)`` float32 images scaled into [0, 1]."""
    fixed2 = load_sample("BrainProtonDensitySliceBorder20").data[40:140, 40:140]
    moving2 = load_sample("BrainProtonDensitySliceBSplined10").data[40:140, 40:140]
    yield "2D ITK 100x100", unit_range(jnp.asarray(fixed2)), unit_range(jnp.asarray(moving2))
    vol = np.asarray(load_sample("colin27_t1_2mm").data)
    lo = [(n - size) // 2 for n in vol.shape]
    crop = unit_range(jnp.asarray(vol[tuple(slice(a, a + size) for a in lo)]))
    yield f"3D Colin27 {size}^3", crop, _known_warp(crop)


def paper_case(upsample: int = 1):
    """The whole Colin27 T1 volume (2 mm, 91 x 109 x 91; ``upsample`` 2: trilinearly resampled to
    182 x 218 x 182, more voxels than the paper's 192 x 160 x 192) vs itself warped by the
    known field (scaled with the grid)."""
    vol = unit_range(jnp.asarray(load_sample("colin27_t1_2mm").data))
    if upsample > 1:
        shape = tuple(upsample * n for n in vol.shape)
        coords = (identity_grid(shape) - (upsample - 1) / 2) / upsample
        vol = warp(vol, coords)
    name = "3D Colin27 " + "x".join(map(str, vol.shape))
    return name, vol, _known_warp(vol, float(upsample))


def fit(fixed, moving, schedule, session=None):
    """The coarse-to-fine loop of ``ppreg.methods.fit_svf`` for both solutions over ``schedule``
    (``(shrink factor, iterations)`` per level, coarsest first); returns ``(displacement,
    iterations, seconds per party, party1 bytes per voxel per iteration at the finest level)``."""
    velocity, seconds, its, per_voxel = None, {"party1": 0.0, "party2": 0.0}, 0, None
    for li, (factor, iterations) in enumerate(schedule):
        coarse = level_shape(fixed.shape, factor)
        velocity = (jnp.zeros(coarse + (fixed.ndim,), jnp.float32) if velocity is None
                    else upsample_field(velocity, fixed.shape, schedule[li - 1][0], factor))
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
                                             label=f"L{li}", frac_bits=FRAC_BITS, **OPTS)
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


def case_rows(name, fixed, moving, schedule, verbose: bool = False) -> list[dict]:
    """One CLEAR and one PPIR(MPC) row for a case (table format of ``bench/bench_affine.py``,
    plus ``bytes_per_voxel``); per-iteration figures are averages over every level's
    iterations, as the paper's."""
    warm = tuple((factor, min(2, its)) for factor, its in schedule)
    fit(fixed, moving, schedule)  # compile (the clear loop's iteration count is static)
    fit(fixed, moving, warm, TwoPartySession())  # the MPC loop compiles per shape
    u_clear, its, sec, _ = fit(fixed, moving, schedule)
    session = TwoPartySession()
    u_mpc, _, sec_mpc, per_voxel = fit(fixed, moving, schedule, session)
    snap = session.channel.traffic.snapshot()
    rows = []
    for solution, u, s in (("CLEAR", u_clear, sec), ("PPIR(MPC)", u_mpc, sec_mpc)):
        secure = solution != "CLEAR"
        loss, mse = _summary(fixed, moving, u)
        row = {
            "case": name, "shape": list(fixed.shape), "transform": "svf", "loss": "lncc (guarded)",
            "schedule": [list(level) for level in schedule],
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
            print_row(row, header=verbose == "header" and len(rows) == 1)
    return rows


def symmetric_rows(name, fixed, moving, schedule, verbose: bool = False) -> list[dict]:
    """The two-party symmetric variant (SyN's two half velocities, Eq. 10-11; each party learns only
    its own force): CLEAR is :func:`ppreg.secure.protocols.lcc.syn_clear`, MPC is ``register(secure="mpc",
    symmetric=True)`` with both peers in this process (each party's own compute from the session's
    clocks; the second run is reported)."""
    from ppreg.register import register
    from ppreg.result import deformable_displacement

    levels, counts = tuple(f for f, _ in schedule), tuple(n for _, n in schedule)
    opts = dict(step=OPTS["step"], sigma_fluid=3.0, sigma_diff=OPTS["sigma_diff"], steps=SVF_STEPS)
    for _ in range(2):
        start = time.perf_counter()
        v1, v2 = lcc.syn_clear(fixed, moving, levels=levels, iterations=counts, **opts)
        clear_s = time.perf_counter() - start
    u_clear = deformable_displacement("svf", jnp.stack([v1, v2]), fixed.shape, None)
    for _ in range(2):
        r = register(fixed, moving, transform="svf", loss="lncc", secure="mpc", symmetric=True, levels=levels,
                     max_iterations=counts, step_size=opts["step"], fluid_sigma=opts["sigma_fluid"])
    u = r.displacement()
    its = r.iterations
    rows = []
    for solution, disp, secs, mb in (("CLEAR (SyN halves)", u_clear, {"party1": clear_s, "party2": 0.0}, None),
                                     ("PPIR(MPC), symmetric", u, r.time_s, r.bytes_per_iteration)):
        loss, mse = _summary(fixed, moving, disp)
        row = {"case": name, "shape": list(fixed.shape), "transform": "svf (symmetric)", "loss": "lncc (guarded)",
               "schedule": [list(level) for level in schedule], "solution": solution, "iterations": its,
               "final_loss": loss, "final_mse": mse,
               "rmse_vs_clear_px": None if mb is None else float(jnp.sqrt(jnp.mean(jnp.sum((disp - u_clear) ** 2, -1)))),
               "time_per_iteration_s": {p: t / its for p, t in secs.items()},
               "mb_per_iteration": {p: (0.0 if mb is None else mb[p] / 1e6) for p in ("party1", "party2")},
               "bytes_per_voxel": None,
               "offline_mb": {p: (0.0 if mb is None else r.bytes[p]["offline"] / 1e6) for p in ("party1", "party2")}}
        rows.append(row)
        if verbose:
            print_row(row, header=verbose == "header" and len(rows) == 1)
    return rows


def cc_rows(size: int = 24, iterations: int = 20, verbose: bool = False, paper: bool = True,
            upsample: int = 1) -> list[dict]:
    """The rows of every case: the 2D crop and the 3D ``size``^3 crop with levels (2, 1) and
    ``iterations`` each, then (``paper``) the whole Colin27 volume (:func:`paper_case`) with the
    paper's schedule :data:`PAPER_SCHEDULE`."""
    rows = []
    for name, fixed, moving in cases(size):
        rows += case_rows(name, fixed, moving, tuple((f, iterations) for f in LEVELS),
                          "header" if verbose and not rows else verbose)
    if paper:
        rows += case_rows(*paper_case(upsample), PAPER_SCHEDULE, verbose)
        rows += symmetric_rows(*paper_case(upsample), PAPER_SCHEDULE, verbose)
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
    ap.add_argument("--iterations", type=int, default=20, help="iterations per level of the crops")
    ap.add_argument("--upsample", type=int, default=1,
                    help="paper-schedule case: resample the Colin27 volume by this factor (2: 182 x 218 x 182)")
    ap.add_argument("--only-paper", action="store_true", help="only the paper-schedule case (and its symmetric run)")
    ap.add_argument("--only-symmetric", action="store_true", help="only the paper-schedule symmetric run")
    ap.add_argument("--frac-bits", type=int, default=None, help="fixed-point fractional bits (default: per level)")
    args = ap.parse_args()
    global FRAC_BITS
    FRAC_BITS = args.frac_bits
    if args.only_symmetric:
        rows = symmetric_rows(*paper_case(args.upsample), PAPER_SCHEDULE, "header")
    elif args.only_paper:
        rows = case_rows(*paper_case(args.upsample), PAPER_SCHEDULE, "header")
        rows += symmetric_rows(*paper_case(args.upsample), PAPER_SCHEDULE, True)
    else:
        rows = cc_rows(args.size, args.iterations, verbose=True, upsample=args.upsample)
    write_results(args.out, {"rows": rows}, levels=list(LEVELS), iterations_per_level=args.iterations,
                  paper_schedule=[list(level) for level in PAPER_SCHEDULE],
                  window=lcc.WINDOW, floor=lcc.FLOOR, frac_bits=FRAC_BITS)


if __name__ == "__main__":
    main()
