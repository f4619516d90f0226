"""PPIR results table in the shape of Taiello et al. 2024, Tables 2, 3 and A1 (in-process channel).

Cases (bundled real data):
  * 2D affine SSD (Table 2): ITK PD Border20 (fixed) vs PD R10X13Y17 (moving), 257 x 221, pyramid 4,2,1.
  * 2D B-spline SSD (Table 3): PD Border20 vs PD BSplined10, control spacing 16, 8, 4 px
    (one control point every 4 px at the finest level), smoothing sigma 2, 1, 0.
  * Rigid point clouds (Table A1): boundary voxels of the largest AAL region of Colin27 (2 mm,
    3D), party2's copy rotated 8 degrees about each axis, shifted (3, -5, 4) voxels, with
    0.2-voxel Gaussian noise (seed 0).
  * 3D affine MI (Table 4): Colin27 T1 brain (fixed) vs MNI152 T1 (moving, displaced by a known
    affine) at 4 mm (``--mi-spacing 2``: 2 mm), 32 bins (``--mi-bins``), URS 10 %, pyramid 2,1
    (:func:`mi_rows`).
  * SVF with ANTs local CC (Table 5): a 2D ITK crop and a 3D Colin27 crop
    (``bench_ppir_cc.cc_rows``; ``--no-cc`` skips them).
Each of CLEAR / PPIR(MPC), with full sampling, URS and GMS (10 % of voxels per iteration).
Registrations run twice; the second run gives the time per iteration per party (each party's
own compute), the traffic is measured on the channel (online MB each party sent per iteration,
offline = dealer material it received over the run). RMSE vs CLEAR is the displacement RMSE
over the fixed grid (points: over the moved points), in voxels. Timings share the machine
with whatever else runs on it.

Usage: python bench/bench_ppir.py [--out bench/results/bench_ppir.json] [--quick] [--mi-spacing 4] [--mi-bins 32]
       [--no-cc]
       python bench/bench_ppir.py --processes [--quick]   # -> bench/results/bench_ppir_processes.json
"""

from __future__ import annotations

import argparse
import time


import numpy as np

from ppreg import register
from ppreg.bspline import n_params
from ppreg.data import load_sample
from ppreg.metrics import field_rmse
from ppreg.pointcloud import boundary_points, rigid_from_points
from ppreg.secure.protocols.points import register_points
from ppreg.secure.session import SecureSession
from ppreg.transforms import n_params as linear_params

from common import fmt, timed_twice, write_results

PAPER = {  # Taiello et al. 2024, per iteration and party: (s, MB)
    ("affine", None): (0.13, 1.54), ("affine", "urs"): (0.02, 0.20), ("affine", "gms"): (0.02, 0.20),
    ("bspline", None): (0.63, 28.98), ("bspline", "urs"): (0.41, 8.00), ("bspline", "gms"): (0.41, 8.00),
    ("points", None): (0.02, 0.03), ("mi", "urs"): (1.02, 15.00), ("svf", None): (24.0, 152.25),
}


def image_rows(quick):
    fixed = load_sample("BrainProtonDensitySliceBorder20").data
    cases = [("2D affine SSD", load_sample("BrainProtonDensitySliceR10X13Y17").data, "affine",
              dict(levels=(4, 2, 1)))]
    cases.append(("2D B-spline SSD", load_sample("BrainProtonDensitySliceBSplined10").data, "bspline",
                  dict(levels=(4, 2, 1), spacing=4)))
    rows = []
    for name, moving, kind, opts in cases:
        for sampling in (None, "urs") if quick else (None, "urs", "gms"):
            if sampling is not None:
                opts = dict(opts, max_iterations=30 if kind != "bspline" else 15)
            ref = None
            for secure in (None, "mpc"):
                r, first, second = timed_twice(lambda: register(fixed, moving, transform=kind, secure=secure,
                                                                sampling=sampling, **opts))
                if secure is None:
                    ref = r
                its = max(r.iterations, 1)
                p = n_params(fixed.shape, 4) if kind == "bspline" else linear_params(kind, 2)
                rows.append({
                    "case": name, "solution": ("PPIR(MPC)" if secure else "CLEAR") + (f" + {sampling.upper()}"
                                                                                      if sampling else ""),
                    "parameters": p, "iterations": r.iterations, "final_mse": r.final_loss,
                    "rmse_vs_clear_px": None if secure is None else
                    field_rmse(r.displacement(), ref.displacement())["voxels"],
                    "time_per_iteration_s": {q: t / its for q, t in r.time_s.items() if q != "dealer"},
                    "mb_per_iteration": {q: b / 1e6 for q, b in r.bytes_per_iteration.items()},
                    "offline_mb": {q: v["offline"] / 1e6 for q, v in r.bytes.items()},
                    "compile_s": max(first - second, 0.0),
                    "paper_s_mb_per_iteration": PAPER[(kind, sampling)] if secure else None,
                })
                print_row(rows[-1], header=len(rows) == 1)
    return rows


# party2's (and the dealer's) policy where the default refuses: the B-spline reveals enough to rebuild
# party2's image (issue 13, finding 1; ppreg.secure.policy max_spline_functionals_per_voxel), so the
# fixed party opts in; 15 iterations at spacings 16, 8, 4 on 257 x 221 reveal about 2.5 per voxel.
PARTY2_POLICY = {"bspline": {"max_spline_functionals_per_voxel": 3.0}}


def process_rows(quick):
    """The 2D affine and B-spline SSD rows with the three parties as separate processes on loopback.

    Each row runs ``ppreg party`` three times over (dealer, fixed, moving;
    :func:`ppreg.party_cli.register_processes`), twice: the first run fills the persistent
    compilation cache. From the second: time per iteration per party is the median of that
    party's own compute per ``query`` (``spline_query``) call, from each process's own report
    (the calls that trace or compile are outliers); ``setup_s`` is the rest of its compute;
    MB per iteration is what each process counted on its ZeroMQ/CURVE connections (frames as
    sent) during the iterations. RMSE vs CLEAR is against the in-process clear registration.
    """
    from ppreg.party_cli import register_processes

    fixed = load_sample("BrainProtonDensitySliceBorder20")
    cases = [("2D affine SSD", "BrainProtonDensitySliceR10X13Y17", "affine", dict(levels=(4, 2, 1))),
             ("2D B-spline SSD", "BrainProtonDensitySliceBSplined10", "bspline", dict(levels=(4, 2, 1), spacing=4))]
    parties = {"party1": "moving", "party2": "fixed", "dealer": "dealer"}
    rows = []
    for name, moving_name, kind, opts in cases:
        moving = load_sample(moving_name)
        op = "spline_query" if kind == "bspline" else "query"
        for sampling in (None,) if quick else (None, "urs"):
            if sampling is not None:
                opts = dict(opts, max_iterations=30 if kind != "bspline" else 15)
            ref = register(fixed, moving, transform=kind, sampling=sampling, **opts)
            reports = {}
            for _ in range(2):
                r = register_processes(fixed, moving, transform=kind, sampling=sampling, reports=reports,
                                       policy=PARTY2_POLICY.get(kind), **opts)
            per_it = {q: reports[p]["ops"][op]["median_s"] for q, p in parties.items()}
            rows.append({
                "case": name, "solution": "PPIR(MPC)" + (f" + {sampling.upper()}" if sampling else "") + ", 3 processes",
                "parameters": n_params(fixed.shape, 4) if kind == "bspline" else linear_params(kind, 2),
                "iterations": r.iterations, "final_mse": r.final_loss,
                "rmse_vs_clear_px": field_rmse(r.displacement(), ref.displacement())["voxels"],
                "time_per_iteration_s": per_it,
                "setup_s": {q: reports[p]["time_s"] - reports[p]["ops"][op]["total_s"] for q, p in parties.items()},
                "wall_s": reports["moving"]["wall_s"],
                "mb_per_iteration": {q: b / 1e6 for q, b in r.bytes_per_iteration.items()},
                "offline_mb": {q: v["offline"] / 1e6 for q, v in r.bytes.items()},
                "compile_s": reports["moving"]["time_s"] - per_it["party1"] * r.iterations,
                "paper_s_mb_per_iteration": PAPER[(kind, sampling)],
            })
            print_row(rows[-1], header=len(rows) == 1)
    rows.append(cc_process_row())
    print_row(rows[-1], header=False)
    return rows


def cc_process_row():
    """SVF with the local CC over three processes: the whole Colin27 volume (2 mm) vs itself warped
    by a known field (``bench_ppir_cc.paper_case``), the paper's schedule (shrink 8, 4, 2, 1 with
    10, 10, 5, 1 iterations). Time per iteration per party: its own compute in the ``lcc_round``
    operations plus party1's warp and update, over all iterations (the first run fills the
    compilation cache; the second is reported); MB per iteration averages every level, as the paper."""
    from bench_ppir_cc import PAPER_SCHEDULE, paper_case

    from ppreg.image import Image
    from ppreg.party_cli import register_processes

    name, fixed_u, moving_u = paper_case()
    affine = load_sample("colin27_t1_2mm").affine
    fixed, moving = (Image(np.asarray(x, np.float32), affine) for x in (fixed_u, moving_u))
    opts = dict(transform="svf", loss="lncc", levels=tuple(f for f, _ in PAPER_SCHEDULE),
                max_iterations=tuple(n for _, n in PAPER_SCHEDULE))
    ref = register(fixed, moving, **opts)
    reports = {}
    for _ in range(2):
        r = register_processes(fixed, moving, reports=reports, **opts)
    parties = {"party1": "moving", "party2": "fixed", "dealer": "dealer"}
    setup = {q: sum(v["total_s"] for op, v in reports[p]["ops"].items() if op not in ("lcc_round", "end"))
             for q, p in parties.items()}
    per_it = {q: (reports[p]["time_s"] - setup[q]) / r.iterations for q, p in parties.items()}
    return {
        "case": name + " CC (paper schedule)", "solution": "PPIR(MPC), 3 processes",
        "parameters": int(np.prod(fixed.shape)) * 3, "iterations": r.iterations, "final_mse": r.final_loss,
        "rmse_vs_clear_px": field_rmse(r.displacement(), ref.displacement())["voxels"],
        "time_per_iteration_s": per_it, "setup_s": setup, "wall_s": reports["moving"]["wall_s"],
        "mb_per_iteration": {q: b / 1e6 for q, b in r.bytes_per_iteration.items()},
        "offline_mb": {q: v["offline"] / 1e6 for q, v in r.bytes.items()}, "compile_s": 0.0,
        "paper_s_mb_per_iteration": PAPER[("svf", None)],
    }


def rotation3(deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    ry = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return rz @ ry @ rx


def point_cases():
    """``(name, p, q, extent)``: a 3D label boundary (the largest AAL region, every boundary voxel)
    and a 2D one of the paper's size (193 points, as its corpus callosum; the largest AAL region of
    the middle axial slice), each moved by a known rigid motion plus 0.2-voxel noise."""
    labels = np.asarray(load_sample("colin27_aal_2mm").data)
    rng = np.random.default_rng(0)  # synthetic data only (no shares)
    label = int(np.bincount(labels[labels > 0].astype(np.int64)).argmax())
    p = boundary_points(labels, label).astype(np.float64)
    rot, t = rotation3(8.0), np.array([3.0, -5.0, 4.0])
    q = (p - p.mean(0)) @ rot.T + p.mean(0) + t + rng.normal(0, 0.2, p.shape)
    yield f"3D point clouds (AAL {label} boundary, n={len(p)})", p, q, float(max(labels.shape))
    plane = (labels[:, :, labels.shape[2] // 2] > 0).astype(np.int32)
    p2 = boundary_points(plane, 1, max_points=193).astype(np.float64)
    a = np.deg2rad(8.0)
    rot2 = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q2 = (p2 - p2.mean(0)) @ rot2.T + p2.mean(0) + np.array([3.0, -5.0]) + rng.normal(0, 0.2, p2.shape)
    yield f"2D point clouds (brain outline, n={len(p2)})", p2, q2, float(max(plane.shape))


def point_rows():
    rows = []
    for name, p, q, extent in point_cases():
        d = p.shape[1]
        t0 = time.perf_counter()
        clear = np.asarray(rigid_from_points(p, q), np.float64)
        clear_s = time.perf_counter() - t0
        runs = []
        for _ in range(2):  # the second run is steady state
            sess = SecureSession(16)
            mat, _ = register_points(p, q, sess, extent=extent)
            runs.append((mat, sess))
        mat, sess = runs[-1]
        moved = [(np.c_[p, np.ones(len(p))] @ np.asarray(m, np.float64).T)[:, :d] for m in (mat, clear)]
        nbytes = sess.bytes_report()
        clear_row = {"case": name, "solution": "CLEAR", "parameters": d * (d + 1) // 2, "iterations": 1,
                     "final_mse": float(np.mean(np.sum((moved[1] - q) ** 2, -1))), "rmse_vs_clear_px": None,
                     "time_per_iteration_s": {"party1": clear_s, "party2": 0.0},
                     "mb_per_iteration": {"party1": 0.0, "party2": 0.0}, "offline_mb": {"party1": 0.0, "party2": 0.0},
                     "compile_s": 0.0, "paper_s_mb_per_iteration": None}
        rows += [clear_row, dict(clear_row, solution="PPIR(MPC)", final_mse=float(np.mean(np.sum((moved[0] - q) ** 2, -1))),
                                 rmse_vs_clear_px=float(np.sqrt(np.mean(np.sum((moved[0] - moved[1]) ** 2, -1)))),
                                 time_per_iteration_s={q_: sess.time[q_] for q_ in ("party1", "party2")},
                                 mb_per_iteration={q_: v["online"] / 1e6 for q_, v in nbytes.items()},
                                 offline_mb={q_: v["offline"] / 1e6 for q_, v in nbytes.items()},
                                 paper_s_mb_per_iteration=PAPER[("points", None)])]
    for row in rows:
        print_row(row, header=False)
    return rows


def print_row(row, header):
    if header:
        print("| case | solution | P | iter | MSE | RMSE vs CLEAR px | p1 s/it | p2 s/it | p1 MB/it | p2 MB/it | "
              "offline MB p2 | compile s | paper s/it, MB/it |")
        print("| --- " * 13 + "|")
    t, mb = row["time_per_iteration_s"], row["mb_per_iteration"]
    paper = row["paper_s_mb_per_iteration"]
    print(f"| {row['case']} | {row['solution']} | {row['parameters']} | {row['iterations']} | "
          f"{row['final_mse']:.3f} | {fmt(row['rmse_vs_clear_px'], '.1e')} | {t['party1']:.4f} | "
          f"{t.get('party2', 0.0):.4f} | {mb['party1']:.4f} | {mb['party2']:.4f} | {row['offline_mb']['party2']:.2f} | "
          f"{row['compile_s']:.2f} | {'-' if paper is None else f'{paper[0]}, {paper[1]}'} |", flush=True)


def mi_case(spacing_mm: float = 4.0):
    """Colin27 T1 (brain, fixed) vs MNI152 T1 (moving) on a common ``spacing_mm`` grid, the moving one
    displaced by a known affine (6 degrees about the z axis, scales 1.04 / 0.97 / 1, shift (5, -7, 4) mm
    about the centre). Each is Gaussian-prefiltered (sigma = spacing / 2 mm) before resampling.
    Returns ``(fixed float32, moving float32)`` or ``None`` without ../shared/data."""
    from pathlib import Path

    import scipy.ndimage as ndi

    from ppreg.image import Image, load, resample_like, resample_to_spacing

    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    paths = root / "colin27" / "ch2bet.nii.gz", root / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not all(p.exists() for p in paths):
        print(f"skipping the 3D MI row: {root} not found")
        return None

    def smooth(path):
        img = load(path)
        return Image(ndi.gaussian_filter(np.asarray(img.data, np.float32), spacing_mm / 2.0 / img.spacing), img.affine)

    fixed = resample_to_spacing(smooth(paths[0]), spacing_mm)
    a = np.deg2rad(6.0)
    pert = np.eye(4)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    pert[:3, :3] = rot @ np.diag([1.04, 0.97, 1.0])
    pert[:3, 3] = [5.0, -7.0, 4.0]
    centre = fixed.affine @ np.r_[(np.array(fixed.shape) - 1) / 2.0, 1.0]
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    grid = Image(np.zeros(fixed.shape, np.float32), back @ pert @ to_centre @ fixed.affine)
    return np.asarray(fixed.data, np.float32), np.asarray(resample_like(smooth(paths[1]), grid).data, np.float32)


def mi_rows(spacing_mm: float = 4.0, bins: int = 32):
    """Table 4: 3D affine MI, CLEAR vs PPIR(MPC) (:mod:`ppreg.secure.protocols.mi`), URS 10 %, pyramid 2,1."""
    case = mi_case(spacing_mm)
    if case is None:
        return []
    fixed, moving = case
    opts = dict(transform="affine", loss="mi", sampling="urs", fraction=0.1, levels=(2, 1), bins=bins)
    rows, ref = [], None
    for secure in (None, "mpc"):
        r, first, second = timed_twice(lambda: register(fixed, moving, secure=secure, **opts))
        ref = r if secure is None else ref
        its = max(r.iterations, 1)
        rows.append({
            "case": f"3D affine MI (Colin27 vs MNI152, {spacing_mm:g} mm {'x'.join(map(str, fixed.shape))}, "
                    f"{bins} bins)",
            "solution": "PPIR(MPC) + URS" if secure else "CLEAR + URS", "parameters": 12,
            "iterations": r.iterations, "final_mse": r.final_loss,
            "final_mi": float(r.levels[-1].losses[-1]) if len(r.levels[-1].losses) else None,
            "rmse_vs_clear_px": None if secure is None else field_rmse(r.displacement(), ref.displacement())["voxels"],
            "time_per_iteration_s": {q: t / its for q, t in r.time_s.items() if q != "dealer"},
            "mb_per_iteration": {q: b / 1e6 for q, b in r.bytes_per_iteration.items()},
            "offline_mb": {q: v["offline"] / 1e6 for q, v in r.bytes.items()},
            "compile_s": max(first - second, 0.0),
            "paper_s_mb_per_iteration": PAPER[("mi", "urs")] if secure else None,
        })
        print_row(rows[-1], header=False)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/bench_ppir.json")
    ap.add_argument("--quick", action="store_true", help="skip the GMS rows (with --processes: the URS rows)")
    ap.add_argument("--processes", action="store_true",
                    help="instead: the 2D SSD rows as three processes over loopback (process_rows)")
    ap.add_argument("--mi-spacing", type=float, default=4.0, help="grid of the 3D MI row in mm (4 or 2)")
    ap.add_argument("--mi-bins", type=int, default=32, help="histogram bins of the 3D MI row")
    ap.add_argument("--no-cc", action="store_true", help="skip the SVF + local CC rows (bench_ppir_cc.cc_rows)")
    args = ap.parse_args()
    if args.processes:
        out = args.out.replace(".json", "_processes.json") if args.out.endswith("bench_ppir.json") else args.out
        write_results(out, {"rows": process_rows(args.quick)}, channel="3 processes, ZeroMQ/CURVE on loopback")
        return
    rows = image_rows(args.quick) + point_rows() + mi_rows(args.mi_spacing, args.mi_bins)
    if not args.no_cc:
        from bench_ppir_cc import cc_rows

        rows += cc_rows(verbose=True)
    write_results(args.out, {"rows": rows}, channel="in-process")


if __name__ == "__main__":
    main()
