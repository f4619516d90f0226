"""PPIR(FHE) rows of Taiello et al. 2024, Tables 2, 3 and A1: CKKS (TenSEAL) packed, v1 and v2.

Same row format as bench_ppir.py (the MPC rows), in-process channel, bundled real data:
  * 2D affine SSD (Table 2): ITK PD Border20 (fixed) vs PD R10X13Y17 (moving), 257 x 221,
    pyramid 4,2,1; full sampling, URS and GMS (10 % of voxels, 30 iterations per level).
  * 2D B-spline SSD (Table 3): PD Border20 vs PD BSplined10, control spacing 16, 8, 4 px,
    smoothing sigma 2, 1, 0 (as bench_ppir.py); full sampling and URS (15 iterations per
    level), the packed B-spline protocol (ppreg.secure.ckks.bspline: party2 decrypts masked
    slots only). The paper has no packed row: ``paper`` quotes its FHE-v2 row (its faster one;
    the JSON also holds v1's).
  * Rigid point clouds (Table A1): boundary voxels of the largest AAL region of Colin27 (2 mm,
    3D), party2's copy rotated 8 degrees about each axis, shifted (3, -5, 4) voxels, 0.2-voxel
    Gaussian noise (seed 0), as in bench_ppir.py.
Each registration runs twice; the second run gives the time per iteration per party (each
party's own compute, its local JAX terms included for party1) and the traffic measured on the
channel: online MB each party sent per iteration, offline MB party2 sent (keys and one-time
encrypted images), keys apart in ``keys_mb``. RMSE vs CLEAR: displacement RMSE over the fixed
grid vs CLEAR with the same sampling, in voxels.

v1 encrypts ``J`` once per level (as the paper) and multiplies every partition that holds a
sample with TenSEAL's diagonal-method product, about ``D`` rotations each, so one iteration at
full resolution takes minutes: its row is timed on two iterations of the coarsest level
(factor 8, 864 voxels, 7 partitions) only, without accuracy columns.

``--only processes`` (not in the default set): v1 and v2 (and packed for reference) in one process
vs over three ``ppreg party`` processes on the loopback interface (ppreg.party_cli.register_processes,
the fixed party's policy opting in to ``ckks_variants``), on the 2D affine case at pyramid level 8
only (864 voxels; v1: 2 iterations, v2 and packed: 10), each run once (compilation and, over
processes, three Python starts included): wall time, each party's own compute and the online bytes
each party sent, as each setting counts them; the fixed-point difference of the two results.

Usage: python bench/bench_ppir_fhe.py [--out bench/results/bench_ppir_fhe.json] [--quick]
       [--only affine,bspline,points,processes]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppreg import optim, register
from ppreg.bspline import n_params
from ppreg.data import load_sample
from ppreg.metrics import field_rmse
from ppreg.pointcloud import boundary_points, rigid_from_points
from ppreg.options import scale_exponent
from ppreg.sampling import n_samples
from ppreg.secure.ckks.points import register_points_ckks
from ppreg.secure.ckks.session import CkksSession
from ppreg.transforms import image_center

from bench_ppir import print_row, rotation3
from common import timed_twice, write_results

PAPER = {  # Taiello et al. 2024, Table 2 and A1: ((s party1, s party2), (MB party1, MB party2)) per iteration
    ("v1", "urs"): ((2.55, 0.02), (0.06, 0.01)), ("v2", "urs"): ((0.01, 0.02), (0.72, 0.88)),
    ("v1", "gms"): ((2.51, 0.02), (0.06, 0.01)), ("v2", "gms"): ((0.02, 0.02), (0.73, 0.93)),
    ("points", None): ((1.10, 0.18), (1.42, 35.93)),
}
PAPER_BSPLINE = {  # Table 3 (cubic splines, SSD): {variant: ((s party1, s party2), (MB party1, MB party2))}
    None: {"v1": ((3.41, 0.00), (0.06, 0.01)), "v2": ((0.98, 0.43), (40.45, 3.56))},
    "urs": {"v1": ((12.23, 0.0), (0.06, 0.01)), "v2": ((0.62, 0.26), (24.74, 3.37))},
    "gms": {"v1": ((11.95, 0.0), (0.06, 0.01)), "v2": ((0.62, 0.26), (24.91, 3.35))},
}


def key_mb(variant: str) -> dict:
    """Offline bytes of the key exchange alone (public context, no image)."""
    return {p: v["offline"] / 1e6 for p, v in CkksSession(variant).bytes_report().items()}


def _row(case, solution, r, ref, compile_s, paper, keys, parameters):
    its = max(r.iterations, 1)
    return {
        "case": case, "solution": solution, "parameters": parameters, "iterations": r.iterations,
        "final_mse": r.final_loss,
        "rmse_vs_clear_px": None if ref is None else field_rmse(r.displacement(), ref.displacement())["voxels"],
        "time_per_iteration_s": {q: t / its for q, t in r.time_s.items()},
        "mb_per_iteration": {q: b / 1e6 for q, b in r.bytes_per_iteration.items()},
        "offline_mb": {q: v["offline"] / 1e6 for q, v in r.bytes.items()},
        "keys_mb": keys, "compile_s": compile_s,
        "paper_s_mb_per_iteration": None if paper is None else [paper[0][0], paper[1][0]],
        "paper": paper,
    }


def affine_rows(quick):
    fixed = load_sample("BrainProtonDensitySliceBorder20").data
    moving = load_sample("BrainProtonDensitySliceR10X13Y17").data
    case = "2D affine SSD"
    keys = {v: key_mb(v) for v in ("packed", "v1", "v2")}
    rows = []
    for sampling in (None, "urs") if quick else (None, "urs", "gms"):
        opts = dict(transform="affine", levels=(4, 2, 1), sampling=sampling)
        if sampling is not None:
            opts["max_iterations"] = 30
        ref, first, second = timed_twice(lambda: register(fixed, moving, **opts))
        suffix = f" + {sampling.upper()}" if sampling else ""
        rows.append(_row(case, "CLEAR" + suffix, ref, None, max(first - second, 0.0), None,
                         {"party1": 0.0, "party2": 0.0}, 6))
        print_row(rows[-1], header=len(rows) == 1)
        variants = ("packed", "v2") if sampling == "urs" or not quick else ("packed",)
        for variant in variants:
            r, first, second = timed_twice(lambda: register(fixed, moving, secure="ckks", ckks_variant=variant,
                                                            **opts))
            rows.append(_row(case, f"PPIR(FHE)-{variant}{suffix}", r, ref, max(first - second, 0.0),
                             PAPER.get((variant, sampling)), keys[variant], 6))
            print_row(rows[-1], header=False)
    rows.append(v1_row(fixed, moving, case, keys["v1"]))
    print_row(rows[-1], header=False)
    return rows


def v1_row(fixed, moving, case, keys, factor=8, iterations=2):
    """v1 + URS timed on ``iterations`` Gauss-Newton iterations of one pyramid level (the image
    encrypted beforehand, as the paper's offline step); no accuracy columns."""
    scale = 2.0 ** max(scale_exponent(fixed), scale_exponent(moving))
    f, m = jnp.asarray(fixed, jnp.float32) / scale, jnp.asarray(moving, jnp.float32) / scale
    flat, coords = optim.fixed_level(f, factor)
    level = optim.Level(optim.moving_level(m, factor), None, coords, image_center(f.shape))
    session = CkksSession("v1")
    session.open_mask("L0/mask", flat)
    before = dict(session.time)
    start = time.perf_counter()
    _, its = session.run_level(jnp.eye(3, dtype=jnp.float32), level, flat, jax.random.key(0), level_index=0,
                               kind="affine", factor=factor, method="urs", k=n_samples(flat.size, 0.1),
                               max_iterations=iterations, tol=0.0, damping=1e-3)
    wall = time.perf_counter() - start
    spent = {p: (session.time[p] - before[p]) / its for p in ("party1", "party2")}
    return {
        "case": case, "solution": f"PPIR(FHE)-v1 + URS (level {factor} only, {its} iterations: timing)",
        "parameters": 6, "iterations": its, "final_mse": float("nan"), "rmse_vs_clear_px": None,
        "time_per_iteration_s": spent,
        "mb_per_iteration": {p: b / its / 1e6 for p, b in session.iteration_traffic.items()},
        "offline_mb": {p: v["offline"] / 1e6 for p, v in session.bytes_report().items()}, "keys_mb": keys,
        "compile_s": max(wall - sum(spent.values()) * its, 0.0),
        "paper_s_mb_per_iteration": [PAPER[("v1", "urs")][0][0], PAPER[("v1", "urs")][1][0]],
        "paper": PAPER[("v1", "urs")],
    }


def process_rows(variants=("packed", "v1", "v2")):
    """Each CKKS variant in one process and over three processes (module docstring); prints a table."""
    from ppreg.party_cli import register_processes

    fixed, moving = load_sample("BrainProtonDensitySliceBorder20"), load_sample("BrainProtonDensitySliceR10X13Y17")
    rows = []
    print("| variant | setting | iter | wall s | p1 compute s | p2 compute s | p1 online MB | p2 online MB | "
          "max param diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant in variants:
        opts = dict(transform="affine", levels=(8,), max_iterations=2 if variant == "v1" else 10)
        start = time.perf_counter()
        local = register(fixed.data, moving.data, secure="ckks", ckks_variant=variant, **opts)
        local_wall = time.perf_counter() - start
        reports: dict = {}
        start = time.perf_counter()
        remote = register_processes(fixed, moving, secure="ckks", timeout=600.0, reports=reports,
                                    policy={"ckks_variants": ["packed", "v1", "v2"]},
                                    **({} if variant == "packed" else {"ckks_variant": variant}), **opts)
        remote_wall = time.perf_counter() - start
        diff = float(np.max(np.abs(np.asarray(remote.params) - np.asarray(local.params))))
        for setting, r, wall in (("1 process", local, local_wall), ("3 processes", remote, remote_wall)):
            row = {"variant": variant, "setting": setting, "iterations": r.iterations, "wall_s": wall,
                   "compute_s": dict(r.time_s), "online_mb": {q: r.bytes[q]["online"] / 1e6 for q in r.bytes},
                   "bytes": r.bytes, "params": np.asarray(r.params).tolist(), "max_param_diff": diff}
            if setting == "3 processes":
                row["reports"] = reports
            rows.append(row)
            print(f"| {variant} | {setting} | {r.iterations} | {wall:.2f} | {r.time_s['party1']:.3f} | "
                  f"{r.time_s['party2']:.3f} | {row['online_mb']['party1']:.3f} | {row['online_mb']['party2']:.4f} | "
                  f"{diff:.1e} |", flush=True)
    return rows


def bspline_rows(quick, header=False):
    """Table 3 shape: CLEAR and PPIR(FHE)-packed, full sampling and URS (and GMS without --quick)."""
    fixed = load_sample("BrainProtonDensitySliceBorder20").data
    moving = load_sample("BrainProtonDensitySliceBSplined10").data
    case, p = "2D B-spline SSD", n_params(fixed.shape, 4)
    keys = key_mb("packed")
    rows = []
    for sampling in (None, "urs") if quick else (None, "urs", "gms"):
        opts = dict(transform="bspline", levels=(4, 2, 1), spacing=4, sampling=sampling)
        if sampling is not None:
            opts["max_iterations"] = 15
        suffix = f" + {sampling.upper()}" if sampling else ""
        ref, first, second = timed_twice(lambda: register(fixed, moving, **opts))
        rows.append(_row(case, "CLEAR" + suffix, ref, None, max(first - second, 0.0), None,
                         {"party1": 0.0, "party2": 0.0}, p))
        print_row(rows[-1], header=header and len(rows) == 1)
        r, first, second = timed_twice(lambda: register(fixed, moving, secure="ckks", **opts))
        paper = PAPER_BSPLINE[sampling]
        rows.append(dict(_row(case, "PPIR(FHE)-packed" + suffix, r, ref, max(first - second, 0.0), paper["v2"],
                              keys, p), paper_variants=paper))
        print_row(rows[-1], header=False)
    return rows


def point_rows():
    labels = np.asarray(load_sample("colin27_aal_2mm").data)
    label = int(np.bincount(labels[labels > 0].astype(np.int64)).argmax())
    p = boundary_points(labels, label).astype(np.float64)
    rot, t = rotation3(8.0), np.array([3.0, -5.0, 4.0])
    q = (p - p.mean(0)) @ rot.T + p.mean(0) + t + np.random.default_rng(0).normal(0, 0.2, p.shape)
    clear = np.asarray(rigid_from_points(p, q), np.float64)
    moved_clear = np.c_[p, np.ones(len(p))] @ clear.T
    rows = []
    for variant in ("packed", "v2"):
        for _ in range(2):  # the second run is steady state
            session = CkksSession(variant)
            keys = {k: v["offline"] / 1e6 for k, v in session.bytes_report().items()}
            mat, _ = register_points_ckks(p, q, session, extent=float(max(labels.shape)))
        moved = np.c_[p, np.ones(len(p))] @ mat.T
        nbytes = session.bytes_report()
        rows.append({
            "case": f"3D point clouds (AAL {label} boundary, n={len(p)})", "solution": f"PPIR(FHE)-{variant}",
            "parameters": 6, "iterations": 1, "final_mse": float(np.mean(np.sum((moved[:, :3] - q) ** 2, -1))),
            "rmse_vs_clear_px": float(np.sqrt(np.mean(np.sum((moved - moved_clear) ** 2, -1)))),
            "time_per_iteration_s": {k: session.time[k] for k in ("party1", "party2")},
            "mb_per_iteration": {k: v["online"] / 1e6 for k, v in nbytes.items()},
            "offline_mb": {k: v["offline"] / 1e6 for k, v in nbytes.items()}, "keys_mb": keys, "compile_s": 0.0,
            "paper_s_mb_per_iteration": [PAPER[("points", None)][0][0], PAPER[("points", None)][1][0]],
            "paper": PAPER[("points", None)],
        })
        print_row(rows[-1], header=False)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/bench_ppir_fhe.json")
    ap.add_argument("--quick", action="store_true", help="skip the GMS rows and full-sampling v2")
    ap.add_argument("--only", default="affine,bspline,points", help="comma-separated cases to run")
    args = ap.parse_args()
    cases = set(args.only.split(","))
    rows = ((affine_rows(args.quick) if "affine" in cases else []) + (bspline_rows(args.quick, header="affine" not in cases) if "bspline" in cases
            else []) + (point_rows() if "points" in cases else []))
    extra = {"process_rows": process_rows()} if "processes" in cases else {}
    write_results(args.out, {"rows": rows, **extra}, channel="in-process",
                  ckks="TenSEAL " + __import__("tenseal").__version__)


if __name__ == "__main__":
    main()
