"""SUITS (Blendowski et al. 2020) against the features it starts from and against mutual information, 2D.

Cases (none used for training or tuning):
  * real: the ITK example slices of one subject, fixed T1 Border20 vs moving PD BSplined10 (257 x 221,
    multi-modal). Reference field: what ppreg's mono-modal registration of PD Border20 (fixed) to PD
    BSplined10 (moving) recovers (``register(..., transform="svf")``, SSD, defaults); the B-spline SSD
    result is reported beside it as the spread of the reference itself. RMSE over the T1 brain
    (T1 > 5 % of its maximum). No labels, so no Dice.
  * synthetic: the 12 held-out test slices of ``ppreg.learned.data.slice_bank("test")`` (6 planes x
    Colin27, MNI152; never seen in training). Fixed: the real T1 slice warped by a random B-spline
    field (``make_test_pair``, the held-out family, spacing 16, at most 4 voxels); moving: a second
    contrast of the unwarped slice, a random intensity per tissue class
    (``synth_from_labels`` + ``augment_intensity``, seeds disjoint from training). Truth: the field.
    Dice and HD95 of the tissue classes (CSF, GM, WM) after warping the moving labels, RMSE in the
    brain.

Rows: identity; SUITS (the shipped ``suits_2d``); the same Gauss-Newton iteration (15 steps) on the
MIND-replicator features SUITS started from (``suits_2d_mind``) and on hand-made MIND-SSC
(``MindFeatures``); each of the three with its own regulariser and lambda, the best of :data:`SETTINGS`
(the diffusion term on the total displacement, Eq. 4, or on each update) on the 24 pairs of the
*validation* slices made the same way (``--no-tune``: the paper's Eq. 4 with lambda 10 for all); ppreg SVF with MI and with MIND (``register(..., transform="svf", loss=...)``;
ppreg's B-spline takes SSD only); SimpleITK B-spline with Mattes MI (mesh ~16 px refined x2 twice,
32 bins on a random 25 % of the pixels, LBFGS2 50 iterations per level, shrink 4,2,1, smoothing
2,1,0 px; when SimpleITK is installed).
Time: wall seconds; the SUITS-family rows are called once per image shape beforehand (compilation),
the SVF rows are not (their first case of each shape includes compilation); one pair at a time.

Usage: python bench/bench_suits.py [--cases N] [--out bench/results/bench_suits.json]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppreg import register
from ppreg.data import load_sample
from ppreg.learned.data import slice_bank
from ppreg.learned.suits import REGULARIZE, MindFeatures
from ppreg.learned.suits_register import register_suits, shipped_suits_path
from ppreg.learned.synth import augment_intensity, make_test_pair, synth_from_labels
from ppreg.metrics import dice, field_rmse, folding, hd95

from bench_deformable import SHRINK, SIGMAS, sitk, sitk_displacement_rc, to_sitk
from bench_learned import warp_labels
from common import fmt, print_header, write_results

SEED = 20260  # test-pair seeds (training used seed 0's streams)
CLASSES = (1, 2, 3)  # tissue classes: CSF, grey matter, white matter
# (regularize, lambda) tried on the validation split, per feature type: the diffusion term on the total
# displacement (the paper's Eq. 4) or on each update (fluid-like)
SETTINGS = (*(("total", lam) for lam in (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)),
            *(("update", lam) for lam in (2.5, 5.0, 10.0, 20.0, 40.0)))


# ----------------------------------------------------------------------------------------------- cases

def real_case():
    """ITK T1 Border20 (fixed) vs PD BSplined10 (moving); reference = mono-modal PD-vs-PD fields."""
    fixed = np.asarray(load_sample("BrainT1SliceBorder20").data, np.float32)
    moving = np.asarray(load_sample("BrainProtonDensitySliceBSplined10").data, np.float32)
    pd = np.asarray(load_sample("BrainProtonDensitySliceBorder20").data, np.float32)
    u_svf = register(pd, moving, transform="svf").displacement()
    u_bsp = register(pd, moving, transform="bspline").displacement()
    mask = fixed > 0.05 * fixed.max()
    spread = field_rmse(u_bsp, u_svf, mask=mask)["voxels"]
    return {"family": "real T1 vs PD BSplined10", "name": "ITK T1/PD", "fixed": fixed, "moving": moving,
            "u_true": np.asarray(u_svf, np.float32), "mask": mask, "fixed_labels": None, "moving_labels": None,
            "reference_spread_vox": spread}


def synthetic_cases(limit=None, split="test", every=1):
    """Slices of ``split`` (every ``every``-th of each subject): fixed the real T1 (warped), moving a
    label-synthesised second contrast."""
    bank = slice_bank(split)
    n = 0
    for i, s in enumerate(np.asarray(bank["slices"]).tolist()):
        for subject, name in enumerate(("colin27", "mni152")):
            if limit is not None and n >= limit:
                return
            if (i + subject) % every:
                continue
            n += 1
            k_field, k_synth, k_aug = jax.random.split(jax.random.key(SEED + 100 * subject + s), 3)
            labels = bank["labels"][subject, i]
            pair = make_test_pair(k_field, bank["images"][subject, i], labels, family="bspline")
            moving = augment_intensity(k_aug, synth_from_labels(k_synth, labels, n_labels=4))
            yield {"family": f"synthetic multi-modal ({split} slices)", "name": f"{name} slice {s}",
                   "fixed": np.asarray(pair["fixed"], np.float32), "moving": np.asarray(moving, np.float32),
                   "u_true": np.asarray(pair["displacement"], np.float32),
                   "mask": np.asarray(pair["fixed_labels"]) > 0,
                   "fixed_labels": np.asarray(pair["fixed_labels"], np.int32),
                   "moving_labels": np.asarray(pair["moving_labels"], np.int32)}


# --------------------------------------------------------------------------------------------- methods

def suits_method(model, setting):
    regularize, lam = setting
    return lambda fixed, moving: register_suits(fixed, moving, model=model, lam=lam,
                                                regularize=regularize).displacement()


def tune_settings(feature_models: dict, cases: list) -> tuple[dict, list]:
    """For each feature model, the (regularize, lambda) of :data:`SETTINGS` with the lowest mean RMSE on
    ``cases``."""
    chosen, rows = {}, []
    for name, model in feature_models.items():
        means = {}
        for setting in SETTINGS:
            fn = suits_method(model, setting)
            means[setting] = float(np.mean([field_rmse(fn(c["fixed"], c["moving"]), c["u_true"],
                                                       mask=c["mask"])["voxels"] for c in cases]))
            rows.append({"method": name, "regularize": setting[0], "lambda": setting[1], "rmse_mean": means[setting]})
            print(f"validation {name:<32} {setting[0]:<6} lambda {setting[1]:<5} RMSE {means[setting]:.4f}", flush=True)
        chosen[name] = min(means, key=means.get)
    return chosen, rows


def svf_method(loss):
    return lambda fixed, moving: register(fixed, moving, transform="svf", loss=loss).displacement()


def identity_method(fixed, moving):
    return np.zeros((*fixed.shape, fixed.ndim), np.float32)


def sitk_bspline_mi(fixed, moving):
    """SimpleITK B-spline (cubic, ~16 px mesh refined to ~4 px), Mattes MI 32 bins on a random 25 % of the
    pixels (ITK's usual MI setting), LBFGS2 50 iterations per level."""
    fixed_img, moving_img = to_sitk(fixed), to_sitk(moving)
    rows, cols = fixed.shape
    tx = sitk.BSplineTransformInitializer(fixed_img, [max(1, round(cols / 16)), max(1, round(rows / 16))], 3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed=SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=50)
    reg.SetInitialTransformAsBSpline(tx, inPlace=True, scaleFactors=[1, 2, 4])
    reg.SetShrinkFactorsPerLevel(SHRINK)
    reg.SetSmoothingSigmasPerLevel(SIGMAS)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return sitk_displacement_rc(reg.Execute(fixed_img, moving_img), fixed_img)


def feature_models(model, mind_model) -> dict:
    return {"SUITS": model, "GN on MIND-pretrained FeatCNN": mind_model, "GN on MIND-SSC": MindFeatures(2)}


def methods(features: dict, settings: dict) -> dict:
    out = {"identity": identity_method,
           **{name: suits_method(m, settings[name]) for name, m in features.items()},
           "ppreg SVF MI": svf_method("mi"), "ppreg SVF MIND": svf_method("mind")}
    if sitk is not None:
        out["SimpleITK B-spline MI"] = sitk_bspline_mi
    return out


# --------------------------------------------------------------------------------------------- scoring

def score(case, u) -> dict:
    out = {"rmse_vox": field_rmse(u, case["u_true"], mask=case["mask"])["voxels"], "folding": folding(u)["fraction"],
           "dice": None, "hd95": None}
    if case["fixed_labels"] is not None:
        warped = warp_labels(case["moving_labels"], u)
        d = dice(case["fixed_labels"], warped, labels=list(CLASSES))
        out["dice"] = float(np.mean(list(d.values())))
        out["hd95"] = float(np.mean([hd95(case["fixed_labels"] == c, warped == c) for c in CLASSES]))
    return out


def run(case, name, fn, warm: set) -> dict:
    tag = (name, case["fixed"].shape)
    if tag not in warm and name.startswith(("SUITS", "GN")):  # compile once per method and shape
        fn(case["fixed"], case["moving"])
        warm.add(tag)
    t0 = time.perf_counter()
    u = np.asarray(fn(case["fixed"], case["moving"]), np.float32)
    seconds = time.perf_counter() - t0
    return {"family": case["family"], "case": case["name"], "method": name, "time_s": seconds, **score(case, u)}


def summarize(rows):
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["family"] == family):
            sel = [r for r in rows if r["family"] == family and r["method"] == method]

            def stat(key, worst):
                vals = [r[key] for r in sel if r[key] is not None]
                return (None, None) if not vals else (float(np.mean(vals)), float(worst(vals)))

            rm, rw = stat("rmse_vox", max)
            dm, dw = stat("dice", min)
            hm, hw = stat("hd95", max)
            tm, _ = stat("time_s", max)
            fm, _ = stat("folding", max)
            out.append({"family": family, "method": method, "cases": len(sel), "rmse_mean": rm, "rmse_worst": rw,
                        "dice_mean": dm, "dice_worst": dw, "hd95_mean": hm, "hd95_worst": hw, "time_s": tm,
                        "folding_mean": fm})
    return out


def print_summary(summary):
    cols = ["family", "method", "n", "RMSE vox mean", "worst", "Dice mean", "worst", "HD95 mean", "worst", "fold %",
            "time s"]
    print_header(cols)
    for s in summary:
        print(" | ".join([s["family"], s["method"], str(s["cases"]), fmt(s["rmse_mean"], ".3f"),
                          fmt(s["rmse_worst"], ".3f"), fmt(s["dice_mean"], ".3f"), fmt(s["dice_worst"], ".3f"),
                          fmt(s["hd95_mean"], ".2f"), fmt(s["hd95_worst"], ".2f"),
                          fmt(None if s["folding_mean"] is None else 100 * s["folding_mean"], ".3f"),
                          fmt(s["time_s"], ".2f")]), flush=True)


def _setting(ap, regularize: str, lam: str) -> tuple[str, float]:
    """One ``--setting``'s (regularize, lambda), or an argparse error naming the bad value."""
    if regularize not in REGULARIZE:
        ap.error(f"--setting REGULARIZE must be one of {REGULARIZE}, got {regularize!r}")
    try:
        value = float(lam)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        ap.error(f"--setting LAMBDA must be a positive number, got {lam!r}")
    return regularize, value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=None, help="at most this many synthetic pairs (quick checks)")
    ap.add_argument("--model", default=str(shipped_suits_path(2)), help="SUITS FeatCNN folder (default: shipped)")
    ap.add_argument("--mind-model", default=None, help="its MIND-replicator stage (default: MODEL + '_mind')")
    ap.add_argument("--out", default="bench/results/bench_suits.json")
    ap.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                    help="pick each feature type's regulariser and lambda on validation pairs (default; else the "
                         "paper's Eq. 4 with lambda 10)")
    ap.add_argument("--validation-every", type=int, default=1,
                    help="tune on every N-th validation slice pair (default 1: all 24)")
    ap.add_argument("--setting", nargs=3, action="append", default=[], metavar=("ROW", "REGULARIZE", "LAMBDA"),
                    help="fix a feature row's setting instead of tuning it (e.g. a value an earlier run chose)")
    args = ap.parse_args(argv)
    fixed = {row: _setting(ap, reg, lam) for row, reg, lam in args.setting}
    mind_model = args.mind_model or args.model.rstrip("/") + "_mind"
    features = feature_models(args.model, mind_model)
    unknown = set(fixed) - set(features)
    if unknown:
        ap.error(f"--setting rows must be among {sorted(features)}, got {sorted(unknown)}")
    settings, tuning = dict(fixed), []
    rest = {name: m for name, m in features.items() if name not in fixed}
    if args.tune and rest:
        chosen, tuning = tune_settings(rest, list(synthetic_cases(split="validation", every=args.validation_every)))
        settings.update(chosen)
    settings.update({name: ("total", 10.0) for name in rest if name not in settings})
    print(f"settings (regularize, lambda): {settings}", flush=True)
    table, warm, rows = methods(features, settings), set(), []
    real = real_case()
    print(f"reference field of the real pair: SVF vs B-spline (both PD vs PD) RMSE {real['reference_spread_vox']:.3f} "
          "voxels in the brain", flush=True)
    for case in [real, *synthetic_cases(args.cases)]:
        for name, fn in table.items():
            rows.append(run(case, name, fn, warm))
            r = rows[-1]
            print(f"{case['name']:<22} {name:<32} rmse {r['rmse_vox']:.3f} dice {fmt(r['dice'], '.3f')} "
                  f"hd95 {fmt(r['hd95'], '.2f')} {r['time_s']:.2f} s", flush=True)
    summary = summarize(rows)
    print_summary(summary)
    write_results(args.out, {"summary": summary, "rows": rows,
                             "reference_spread_vox": real["reference_spread_vox"], "settings": settings,
                             "settings_given": fixed,
                             "tuning": tuning,
                             "models": {"suits": args.model, "mind": mind_model}},
                  bench="bench_suits", jnp_dtype=str(jnp.zeros(()).dtype))


if __name__ == "__main__":
    main()
