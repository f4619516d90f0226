"""Alpha-predicting CNN (004 Sec. 3.2; ppreg.learned.alpha_cnn) against the Laplace alpha_MAP it replaces.

Data: the labelled pairs of ``scripts/train_alpha_cnn.py`` (100 x 100 bull's-eyes, targets from
velocities drawn from FLASH's prior at alpha 3, 6, 11, noise 0.03; labels ``alpha_MAP`` by
:func:`ppreg.spectral.evidence.estimate_alpha`, shards in ``bench/alpha_labels``), the
**test** split only (15 % of the 900 pair indices, never used in training or epoch selection).

Reports (issue 14):
- predicted alpha vs alpha_MAP: median, 90th percentile and worst relative error (and both
  against the alpha the velocity was drawn at, for context);
  The row ``train_mean_vs_map`` is the no-image baseline: one alpha for every pair, the geometric
  mean of the labelled train split's alpha_MAP;
- registration error: FLASH (``ppreg.register(transform="flash")``, L-BFGS, 150 iterations) at the
  predicted alpha vs at alpha_MAP; MSE of the warped source to the target (images over their
  common max), the ratio per pair (mean, median, worst); and, since the target's noise dominates
  that MSE, the RMS error (pixels, whole image) of the recovered displacement against the true one
  (``phi_1^-1 - x`` shot from the drawn velocity at the drawn alpha), with its ratio per pair and the
  true displacement's own RMS (the error of no registration);
- time: one prediction (:func:`ppreg.learned.alpha_cnn.network_alpha`, warm, every test pair) vs one
  MAP estimate, as measured where it ran on the same machine: the labels' own wall times (the label
  setting, every labelled pair; the few first ones per worker include compilation) and the full
  estimate of ``scripts/train_alpha_cnn.py check`` (5 rounds from alpha 1); medians.

Usage: python bench/bench_alpha.py [--model DIR] [--out bench/results/bench_alpha.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import train_alpha_cnn as tac  # noqa: E402
from common import fmt, print_header, write_results  # noqa: E402


def _stats(x) -> dict:
    x = np.asarray(x, np.float64)
    return {"median": float(np.median(x)), "p90": float(np.percentile(x, 90)), "mean": float(np.mean(x)),
            "max": float(np.max(x))}


def main(argv=None) -> None:
    """Run the three measurements and write the JSON."""
    import jax.numpy as jnp

    import ppreg
    from ppreg.learned.alpha_cnn import network_alpha, predict_alpha, resolve_alpha_model
    from ppreg.spectral.register import flash_displacement
    from ppreg.spectral.symbols import Band

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="AlphaCNN folder (default: the shipped 2D model)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_alpha.json"))
    p.add_argument("--registration-pairs", type=int, default=None,
                   help="register only the first N test pairs (default: all; the alpha errors use all)")
    args = p.parse_args(argv)
    data = tac.dataset()
    test = data["split"]["test"]
    if len(test) < 1:
        raise SystemExit("no labelled test pairs")
    ckpt = resolve_alpha_model(args.model, 2)
    src, tgt = data["source"][test], data["target"][test]
    amap, atrue = data["alpha_map"][test], data["alpha_true"][test]
    pred = np.asarray(predict_alpha(ckpt.model, jnp.asarray(src), jnp.asarray(tgt)), np.float64)
    rel = np.abs(pred - amap) / amap
    const = float(np.exp(np.mean(np.log(data["alpha_map"][data["split"]["train"]]))))  # no-image baseline
    alpha_rows = {"pred_vs_map": _stats(rel), "pred_vs_true": _stats(np.abs(pred - atrue) / atrue),
                  "map_vs_true": _stats(np.abs(amap - atrue) / atrue),
                  "train_mean_vs_map": _stats(np.abs(const - amap) / amap)}

    flash = {"band_size": tac.CONFIG["band_size"], "sigma": tac.CONFIG["noise"]}
    band = Band(tuple(tac.CONFIG["shape"]), tac.CONFIG["band_size"])
    mse, u_err = {"pred": [], "map": []}, {"pred": [], "map": [], "identity": []}
    n_reg = len(test) if args.registration_pairs is None else min(len(test), args.registration_pairs)
    for k in range(n_reg):
        u_true = flash_displacement(data["v0"][test[k]], band, alpha=float(atrue[k]))
        u_err["identity"].append(float(np.sqrt(np.mean(np.sum(u_true ** 2, axis=-1)))))
        for name, a in (("pred", pred[k]), ("map", amap[k])):
            r = ppreg.register(tgt[k], src[k], transform="flash", flash_options={**flash, "alpha": float(a)})
            mse[name].append(float(r.final_loss))
            u_err[name].append(float(np.sqrt(np.mean(np.sum((r.displacement() - u_true) ** 2, axis=-1)))))
    ratio = np.asarray(mse["pred"]) / np.asarray(mse["map"])
    u_ratio = np.asarray(u_err["pred"]) / np.asarray(u_err["map"])

    cfg = tac.CONFIG
    network_alpha(ckpt, src[0], tgt[0], **flash)  # compiles the network (not timed)
    t_net = []
    for k in range(len(test)):
        t0 = time.perf_counter()
        network_alpha(ckpt, src[k], tgt[k], **flash)
        t_net.append(time.perf_counter() - t0)
    labels = tac.read_labels()
    t_label = [labels[int(i)]["seconds"] for i in data["index"]]  # every label's wall time (a few compile)
    check = tac.ROOT / "bench" / "results" / "alpha_label_check.json"
    t_full = [r["seconds_full"] for r in json.loads(check.read_text())["rows"]] if check.exists() else []
    timing = {"predict_s_median": float(np.median(t_net)), "label_s_median": float(np.median(t_label)),
              "full_map_s_median": float(np.median(t_full)) if t_full else None,
              "ratio_label_over_predict": float(np.median(t_label) / np.median(t_net)),
              "ratio_full_over_predict": float(np.median(t_full) / np.median(t_net)) if t_full else None,
              "predict_pairs": len(t_net), "label_pairs": len(t_label), "full_pairs": len(t_full)}

    print(f"test pairs: {len(test)} (of {len(data['index'])} labelled; split of {tac.PAIRS})")
    print_header(["relative error", "median", "p90", "max"])
    for name, row in alpha_rows.items():
        print(f"{name} | {fmt(row['median'], '.3f')} | {fmt(row['p90'], '.3f')} | {fmt(row['max'], '.3f')}")
    print(f"registered: the first {n_reg} test pairs")
    print_header(["MSE", "mean", "median", "worst"])
    for name in ("pred", "map"):
        v = np.asarray(mse[name])
        print(f"alpha {name} | {v.mean():.3e} | {np.median(v):.3e} | {v.max():.3e}")
    print(f"ratio pred/map | {ratio.mean():.4f} | {np.median(ratio):.4f} | {ratio.max():.4f}")
    print_header(["displacement RMSE vs truth (px)", "mean", "median", "worst"])
    for name in ("identity", "pred", "map"):
        v = np.asarray(u_err[name])
        print(f"alpha {name} | {v.mean():.4f} | {np.median(v):.4f} | {v.max():.4f}")
    print(f"ratio pred/map | {u_ratio.mean():.4f} | {np.median(u_ratio):.4f} | {u_ratio.max():.4f}")
    print(f"time (medians): prediction {timing['predict_s_median'] * 1e3:.1f} ms ({len(t_net)} pairs), label "
          f"{timing['label_s_median']:.1f} s ({len(t_label)}; ratio {timing['ratio_label_over_predict']:.0f}x), "
          f"full MAP "
          f"{fmt(timing['full_map_s_median'], '.1f')} s ({len(t_full)}; ratio "
          f"{fmt(timing['ratio_full_over_predict'], '.0f')}x)")
    rows = [{"index": int(data["index"][i]), "alpha_true": float(atrue[k]), "alpha_map": float(amap[k]),
             "alpha_pred": float(pred[k]),
             **({"mse_pred": mse["pred"][k], "mse_map": mse["map"][k], "u_rmse_pred": u_err["pred"][k],
                 "u_rmse_map": u_err["map"][k]} if k < n_reg else {})}
            for k, i in enumerate(test)]
    write_results(args.out, {"model": str(ckpt.path), "label_config": cfg, "full_estimate": tac.FULL,
                             "test_pairs": int(len(test)), "registered_pairs": n_reg,
                             "labelled_pairs": int(len(data["index"])),
                             "alpha_relative_error": alpha_rows,
                             "mse": {"pred": _stats(mse["pred"]), "map": _stats(mse["map"]),
                                     "ratio_pred_over_map": _stats(ratio)},
                             "displacement_rmse_px": {**{k: _stats(v) for k, v in u_err.items()},
                                                      "ratio_pred_over_map": _stats(u_ratio)},
                             "timing": timing, "rows": rows})


if __name__ == "__main__":
    main()
