"""Side-by-side registrations on the bundled real data: ppreg vs SimpleITK.

Cases (bundled ITK 2D brain slices, 257 x 221, 1 px = 1 mm):
  * B-spline SSD: fixed PD Border20, moving PD BSplined10 (MSE before ~1309).
      - ppreg: ``register(fixed, moving, transform="bspline")`` (defaults: spacing 4, levels 4,2,1,
        i.e. control spacings 16, 8, 4 px at full resolution, smoothing sigma 2, 1, 0 px,
        bending-energy regulariser 0.01, Gauss-Newton-CG).
      - SimpleITK: ``BSplineTransformInitializer`` with a mesh of (221/16, 257/16) -> (14, 16) cells
        (x, y), refined x2 per level by ``SetInitialTransformAsBSpline(scaleFactors=[1, 2, 4])`` so
        the control spacing is ~16, 8, 4 px as in ppreg; MeanSquares on every pixel, linear
        interpolation, shrink factors 4,2,1 and smoothing sigmas 2,1,0 px, no regulariser (as the
        ITK Software Guide's DeformableRegistration examples and SimpleITK's
        ImageRegistrationMethodBSpline3). Two optimizers, 100 iterations per level:
        GradientDescentLineSearch (learning rate 5, convergence 1e-6 over a window of 5) and
        LBFGS2 (solution accuracy 1e-5). LBFGSB cannot be used here: SimpleITK sizes its scales
        for the first level's control grid and throws when the grid is refined ("Size of scales
        (646) must equal number of local parameters (2170)").
    Reported: MSE after (mean over all fixed pixels of (warped - fixed)^2, warped with linear
    interpolation and 0 outside), folding pixels (``ppreg.metrics.folding`` on the displacement on the
    fixed grid; SimpleITK's via ``TransformToDisplacementField``, converted from physical (x, y) to
    ppreg's (row, col)), and wall time. ppreg runs twice (1st call includes compilation).
  * Multi-modal mutual information: fixed T1 Border20, moving PD Shifted13x17y (translation, known
    (row, col) = (17, 13)) and PD R10X13Y17 (rigid: 10 deg about (x, y) = (110.5, 128.5), then
    (x, y) = (13, 16)).
      - ppreg: ``register(..., transform="translation"|"rigid", loss="mi")`` (defaults: 32 bins,
        regular-step gradient descent, levels 4,2,1, every voxel).
      - SimpleITK: Mattes MI (32 bins, every pixel), TranslationTransform (zero start) or
        Euler2DTransform centred by ``CenteredTransformInitializer(GEOMETRY)`` (no moments, so both
        start from the identity), RegularStepGradientDescent (learning rate 2, min step 1e-4,
        200 iterations, relaxation 0.5, scales from physical shift), shrink 4,2,1, smoothing 2,1,0.
    Reported: translation (row, col) (rigid: about the known centre (row, col) = (128.5, 110.5)),
    |angle| in degrees (ppreg's angle is in (row, col) order, so its sign is opposite to ITK's),
    errors vs the known answer, displacement RMSE vs the known transform, time.

SimpleITK is an optional extra (``pip install '.[bench]'``); without it the peer rows are skipped.

Usage: python bench/bench_deformable.py [--out bench/results/bench_deformable.json] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from ppreg import register
from ppreg.data import load_sample
from ppreg.metrics import displacement_rmse, folding

from common import fmt, print_header, write_results

try:
    import SimpleITK as sitk
except ImportError:  # optional benchmark extra
    sitk = None

SHRINK = [4, 2, 1]
SIGMAS = [2, 1, 0]
SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (x, y, 1) <-> (row, col, 1)
KNOWN_CENTER_RC = np.array([128.5, 110.5])


def xy_to_rc_matrix(a_xy):
    """Homogeneous fixed->moving matrix in physical (x, y) -> the same map in (row, col) indices."""
    return SWAP @ np.asarray(a_xy, np.float64) @ SWAP


def truth_matrices():
    """Known fixed->moving (row, col) matrices of the MI cases."""
    shift = np.eye(3)
    shift[:2, 2] = [17.0, 13.0]
    th = math.radians(10.0)
    a = np.eye(3)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    c, t = np.array([110.5, 128.5]), np.array([13.0, 16.0])
    a[:2, :2], a[:2, 2] = rot, c + t - rot @ c
    return {"translation": shift, "rigid": xy_to_rc_matrix(a)}


def describe(mat, kind, truth):
    """Translation (row, col), |angle| deg and their errors vs ``truth``; rigid translation is taken
    about the known centre, so that it compares with the known (16, 13)."""
    mat = np.asarray(mat, np.float64)
    lin, off = mat[:2, :2], mat[:2, 2]
    c = np.zeros(2) if kind == "translation" else KNOWN_CENTER_RC
    t = lin @ c + off - c
    t_true = truth[:2, :2] @ c + truth[:2, 2] - c
    angle = abs(math.degrees(math.atan2(lin[1, 0], lin[0, 0])))
    angle_true = abs(math.degrees(math.atan2(truth[1, 0], truth[0, 0])))
    return {
        "translation_rc": t.tolist(),
        "translation_error_px": float(np.linalg.norm(t - t_true)),
        "abs_angle_deg": angle,
        "angle_error_deg": abs(angle - angle_true),
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def to_sitk(array):
    return sitk.GetImageFromArray(np.asarray(array, np.float32))  # x = last axis (col), y = row


def sitk_warp(moving, fixed_img, tx):
    return sitk.GetArrayFromImage(sitk.Resample(to_sitk(moving), fixed_img, tx, sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat32))


def sitk_displacement_rc(tx, fixed_img):
    """SimpleITK transform -> displacement on the fixed grid, ppreg layout (rows, cols, 2) (row, col)."""
    flt = sitk.TransformToDisplacementFieldFilter()
    flt.SetReferenceImage(fixed_img)
    flt.SetOutputPixelType(sitk.sitkVectorFloat64)
    field = sitk.GetArrayFromImage(flt.Execute(tx))  # (rows, cols, 2) with components (x, y)
    return np.ascontiguousarray(field[..., ::-1], np.float32)


def count_iterations(reg):
    """Optimizer iterations per pyramid level of a SimpleITK registration (filled while it runs)."""
    per_level = []

    def on_iteration():
        if not per_level:
            per_level.append(0)
        per_level[-1] += 1

    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: per_level.append(0))
    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    return per_level


# --- B-spline -----------------------------------------------------------------------------


SITK_BSPLINE_OPTIMIZERS = {
    # name: (description, setter); 100 iterations per level for both
    "GDLS": ("GradientDescentLineSearch lr 5, 100 it/level, convergence 1e-6 over 5",
             lambda reg: reg.SetOptimizerAsGradientDescentLineSearch(
                 learningRate=5.0, numberOfIterations=100, convergenceMinimumValue=1e-6, convergenceWindowSize=5)),
    "LBFGS2": ("LBFGS2 accuracy 1e-5, 100 it/level",
               lambda reg: reg.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=100)),
}


def sitk_bspline(fixed, moving, optimizer):
    fixed_img, moving_img = to_sitk(fixed), to_sitk(moving)
    rows, cols = fixed.shape
    mesh = [max(1, round(cols / 16)), max(1, round(rows / 16))]  # (x, y): ~16 px control spacing
    tx = sitk.BSplineTransformInitializer(fixed_img, mesh, 3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    description, set_optimizer = SITK_BSPLINE_OPTIMIZERS[optimizer]
    set_optimizer(reg)
    reg.SetInitialTransformAsBSpline(tx, inPlace=True, scaleFactors=[1, 2, 4])
    reg.SetShrinkFactorsPerLevel(SHRINK)
    reg.SetSmoothingSigmasPerLevel(SIGMAS)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    iterations = count_iterations(reg)
    out, seconds = timed(lambda: reg.Execute(fixed_img, moving_img))
    warped = sitk_warp(moving, fixed_img, out)
    u = sitk_displacement_rc(out, fixed_img)
    return {
        "solution": f"SimpleITK {optimizer}", "iterations": int(sum(iterations)), "iterations_per_level": iterations,
        "final_mse": float(np.mean((warped - fixed) ** 2)), "folding": folding(u),
        "time_s": seconds, "time_second_s": None, "compile_s": None,
        "config": f"BSpline mesh {mesh} (x, y) x [1, 2, 4], MeanSquares, {description}, shrink 4,2,1, sigma 2,1,0",
        "stop": reg.GetOptimizerStopConditionDescription(),
    }


def ppreg_bspline(fixed, moving):
    r1, first = timed(lambda: register(fixed, moving, transform="bspline"))
    r, second = timed(lambda: register(fixed, moving, transform="bspline"))
    u = r.displacement()
    mse = float(np.mean((r.warped - fixed) ** 2))
    return {
        "solution": "ppreg", "iterations": r.iterations,
        "iterations_per_level": [lv.iterations for lv in r.levels],
        "final_mse": mse, "reported_final_loss": r.final_loss, "folding": folding(u),
        "time_s": first, "time_second_s": second, "compile_s": max(first - second, 0.0),
        "config": "bspline spacing 4, levels 4,2,1 (control 16,8,4 px), GN-CG, bending 0.01",
        "same_result_both_calls": bool(np.array_equal(r1.warped, r.warped)),
    }


# --- mutual information -------------------------------------------------------------------


def sitk_mi(fixed, moving, kind):
    fixed_img, moving_img = to_sitk(fixed), to_sitk(moving)
    if kind == "translation":
        init = sitk.TranslationTransform(2)
    else:
        init = sitk.CenteredTransformInitializer(fixed_img, moving_img, sitk.Euler2DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=200,
                                                 relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    reg.SetShrinkFactorsPerLevel(SHRINK)
    reg.SetSmoothingSigmasPerLevel(SIGMAS)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    iterations = count_iterations(reg)
    out, seconds = timed(lambda: reg.Execute(fixed_img, moving_img))
    # the fitted map as a (row, col) matrix, fitted to its displacement field on the fixed grid
    u = sitk_displacement_rc(out, fixed_img).astype(np.float64)
    mat = matrix_from_field(u)
    return mat, {"solution": "SimpleITK", "iterations": int(sum(iterations)), "iterations_per_level": iterations,
                 "time_s": seconds, "time_second_s": None, "compile_s": None,
                 "stop": reg.GetOptimizerStopConditionDescription()}


def matrix_from_field(u):
    """Least-squares (row, col) homogeneous matrix of a linear displacement field ``u`` (exact for one)."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in u.shape[:-1]], indexing="ij"), -1)
    x = np.concatenate([grid.reshape(-1, 2), np.ones((grid[..., 0].size, 1))], axis=1)
    y = (grid + u).reshape(-1, 2)
    sol, *_ = np.linalg.lstsq(x, y, rcond=None)
    mat = np.eye(3)
    mat[:2, :] = sol.T
    return mat


def ppreg_mi(fixed, moving, kind):
    _, first = timed(lambda: register(fixed, moving, transform=kind, loss="mi"))
    r, second = timed(lambda: register(fixed, moving, transform=kind, loss="mi"))
    return r.matrix, {"solution": "ppreg", "iterations": r.iterations,
                      "iterations_per_level": [lv.iterations for lv in r.levels],
                      "time_s": second, "time_second_s": second, "first_call_s": first,
                      "compile_s": max(first - second, 0.0)}


# --- tables -------------------------------------------------------------------------------

BSPLINE_COLUMNS = ("case", "solution", "iter", "MSE before", "MSE after", "folding px", "time s (1st call)",
                   "time s (2nd call)", "compile s", "time / SimpleITK")
MI_COLUMNS = ("case", "solution", "iter", "t (row, col)", "abs angle deg", "t error px", "angle error deg",
              "RMSE vs truth px", "time s", "compile s", "time / SimpleITK")


def print_table(columns, rows):
    print_header(columns)
    for row in rows:
        print(" | ".join(row), flush=True)


def bspline_cells(row):
    ratio = row.get("time_ratio_vs_sitk")
    ratio_txt = "-" if ratio is None else " / ".join(f"{v:.2f}" for v in ratio)
    return [row["case"], row["solution"], str(row["iterations"]), f"{row['mse_before']:.1f}",
            f"{row['final_mse']:.2f}", str(row["folding"]["voxels"]), f"{row['time_s']:.2f}",
            fmt(row["time_second_s"], ".2f"), fmt(row["compile_s"], ".2f"), ratio_txt]


def mi_cells(row):
    t = row["translation_rc"]
    return [row["case"], row["solution"], str(row["iterations"]), f"({t[0]:.2f}, {t[1]:.2f})",
            f"{row['abs_angle_deg']:.2f}", f"{row['translation_error_px']:.3f}", f"{row['angle_error_deg']:.3f}",
            f"{row['rmse_vs_truth_px']:.3f}", f"{row['time_s']:.2f}", fmt(row["compile_s"], ".2f"),
            fmt(row.get("time_ratio_vs_sitk"), ".2f")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/bench_deformable.json")
    ap.add_argument("--quick", action="store_true", help="skip the SimpleITK LBFGS2 B-spline row (~3 min) "
                                                         "and the MI translation case")
    args = ap.parse_args()
    if sitk is None:
        print("SimpleITK not installed: peer rows skipped")

    fixed = load_sample("BrainProtonDensitySliceBorder20").data
    moving = load_sample("BrainProtonDensitySliceBSplined10").data
    before = float(np.mean((moving - fixed) ** 2))
    case = "2D B-spline SSD (PD BSplined10)"
    bspline_rows = [ppreg_bspline(fixed, moving)]
    if sitk is not None:
        for optimizer in ("GDLS",) if args.quick else ("GDLS", "LBFGS2"):
            bspline_rows.append(sitk_bspline(fixed, moving, optimizer))
    for row in bspline_rows:
        row.update(case=case, shape=list(fixed.shape), mse_before=before)
    ours = bspline_rows[0]
    for row in bspline_rows[1:]:
        row["time_ratio_vs_sitk"] = [ours["time_s"] / row["time_s"], ours["time_second_s"] / row["time_s"]]
    print_table(BSPLINE_COLUMNS, [bspline_cells(r) for r in bspline_rows])
    print("time / SimpleITK (on the SimpleITK rows): ppreg 1st call / SimpleITK, ppreg 2nd call / SimpleITK\n",
          flush=True)

    fixed_t1 = load_sample("BrainT1SliceBorder20").data
    truths = truth_matrices()
    mi_cases = [("2D MI translation (T1 vs PD Shifted13x17y)", "BrainProtonDensitySliceShifted13x17y", "translation"),
                ("2D MI rigid (T1 vs PD R10X13Y17)", "BrainProtonDensitySliceR10X13Y17", "rigid")]
    if args.quick:
        mi_cases = mi_cases[1:]
    mi_rows = []
    for name, sample, kind in mi_cases:
        mov = load_sample(sample).data
        runners = [ppreg_mi] + ([sitk_mi] if sitk is not None else [])
        rows = []
        for runner in runners:
            mat, row = runner(fixed_t1, mov, kind)
            row.update(case=name, transform=kind, moving=sample, matrix_rc=np.asarray(mat).tolist(),
                       rmse_vs_truth_px=displacement_rmse(mat, truths[kind], fixed_t1.shape)["voxels"],
                       **describe(mat, kind, truths[kind]))
            rows.append(row)
        if sitk is not None:
            rows[0]["time_ratio_vs_sitk"] = rows[0]["time_s"] / rows[1]["time_s"]
        mi_rows.extend(rows)
    print_table(MI_COLUMNS, [mi_cells(r) for r in mi_rows])
    print("ppreg time s = 2nd call (compile s = 1st call - 2nd call); rigid t is about the known centre "
          "(row, col) = (128.5, 110.5), truth (16, 13); translation truth (17, 13)", flush=True)

    write_results(args.out, {"bspline": bspline_rows, "mi": mi_rows},
                  simpleitk=None if sitk is None else sitk.Version.VersionString(),
                  simpleitk_threads=None if sitk is None else sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
                  quick=args.quick)


if __name__ == "__main__":
    main()
