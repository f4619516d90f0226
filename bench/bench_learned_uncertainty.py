"""Why vxm-diff's uncertainty map hardly tracks its error: a diagnosis on held-out 2D pairs.

``bench_learned.py`` reports the Pearson correlation, over brain voxels, of the predicted std
``sqrt(uncertainty)`` (16 posterior samples, as ``register_vxm`` computes it) with the actual error
``|u_pred - u_true|``. This script takes that number apart, per case family, for one 2D model:

- ``log_sigma``: mean, std and 1st / 99th percentiles of the network's log posterior std of the
  velocity (half-resolution voxels) over the whole grid, beside the value the KL term alone
  would choose in the interior, ``-0.5 log(lam * 2 ndim)`` (minimum of ``0.5 lam D sigma^2 - log sigma``
  with the degree ``D = 2 ndim``): how far the data term moves sigma away from the prior.
- ``std CV (K=REF)``: spread of the predicted std of the displacement over the brain (std / mean),
  from a near-converged reference of ``--ref-samples`` posterior samples (drawn in chunks).
- ``r(std_K, std_ref)`` for K = 16 and 128: how much of a K-sample map is Monte-Carlo noise.
- ``r(std_16, err)`` and ``r(std_ref, err)``: the correlation the benchmark reports, and the same
  with the converged map (is the small number a sampling artefact?).
- ``r(std_ref, |grad f|)``: does sigma follow the image structure (the aperture: smaller where the
  fixed image has edges)?
- ``r(|u_true|, err)`` and ``|u_pred| / |u_true|`` (means over the brain): is the error a shrinkage
  bias (under-registration) rather than the posterior spread?

Case families (2 pairs each, the first pairs of ``bench_learned.py``'s families): ``test slices``
(held-out planes, held-out B-spline fields), ``ITK PD slice`` (another subject, B-spline fields) and
``test slices, training family`` (the same held-out planes deformed by the *training* family,
``make_test_pair(family="svf")``, seeds of the test slices): in distribution for the deformation.

``--split validation`` runs the validation slices instead (family ``validation slices``), to choose training options
without looking at the test part.

Usage: python bench/bench_learned_uncertainty.py [--model PATH] [--pairs 2] [--ref-samples 2048] [--split test|validation]
    [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ppreg.learned.data import normalize_intensity, pad_to_multiple, slice_bank, unpad
from ppreg.learned.register import resolve_model, shipped_model_path
from ppreg.learned.synth import make_test_pair
from ppreg.learned.vxm import integrate, predict, sample_velocity

import bench_learned as bl
from common import fmt, print_header, write_results

CHUNK = 128  # posterior samples per jitted call of the reference map


def svf_family_cases():
    """Test slices under the training deformation family (the test slices' seeds)."""
    bank = slice_bank("test")
    for i, s in enumerate(np.asarray(bank["slices"]).tolist()):
        for subject, name in enumerate(("colin27", "mni152")):
            key = jax.random.key(bl.SEEDS["test slices"] + 100 * subject + s)
            pair = make_test_pair(key, bank["images"][subject, i], bank["labels"][subject, i], family="svf")
            yield bl._case("test slices, training family", f"{name} slice {s}", pair["fixed"], pair["moving"],
                           u_true=pair["displacement"], mask=np.asarray(pair["fixed_labels"]) > 0)


FAMILIES = (bl.test_slice_cases, bl.pd_slice_cases, svf_family_cases)


@eqx.filter_jit
def _moments(model, fixed, moving, key):
    """Sums of ``CHUNK`` sampled displacements and of their squares."""
    mu, log_sigma = model(fixed, moving)

    def draw(k):
        z = sample_velocity(k, mu, log_sigma, covariance=model.covariance, smooth_sigma=model.smooth_sigma)
        return integrate(z, fixed.shape, steps=model.int_steps)

    fields = jax.vmap(draw)(jax.random.split(key, CHUNK))
    return jnp.sum(fields, 0), jnp.sum(fields**2, 0)


_predict = eqx.filter_jit(predict)


def _r(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def diagnose(model, case, ref_samples: int) -> dict:
    f, pads = pad_to_multiple(normalize_intensity(case["fixed"]), model.multiple)
    m, _ = pad_to_multiple(normalize_intensity(case["moving"]), model.multiple)
    f, m = jnp.asarray(f), jnp.asarray(m)
    out16 = _predict(model, f, m, key=jax.random.key(0), samples=16)  # what register_vxm computes (key 0)
    mask = case["mask"]
    std = lambda var: np.sqrt(np.maximum(np.asarray(unpad(var, pads)), 0.0))[mask]  # noqa: E731
    s1 = s2 = 0.0
    maps = {}
    for i in range(math.ceil(ref_samples / CHUNK)):
        a, b = _moments(model, f, m, jax.random.key(1000 + i))
        s1, s2, n = s1 + a, s2 + b, (i + 1) * CHUNK
        if n == 128:
            maps[128] = std(jnp.sum(s2 / n - (s1 / n) ** 2, -1))
    ref = std(jnp.sum(s2 / n - (s1 / n) ** 2, -1))
    u = np.asarray(unpad(out16["displacement"], pads))
    err = np.linalg.norm(u - case["u_true"], axis=-1)[mask]
    truth = np.linalg.norm(case["u_true"], axis=-1)[mask]
    grad = np.linalg.norm(np.stack(np.gradient(case["fixed"])), axis=0)[mask]
    log_sigma = np.asarray(out16["log_sigma"])
    return {"case": case["name"], "log_sigma_mean": float(log_sigma.mean()), "log_sigma_std": float(log_sigma.std()),
            "log_sigma_p1": float(np.percentile(log_sigma, 1)), "log_sigma_p99": float(np.percentile(log_sigma, 99)),
            "ref_samples": n, "std_ref_mean": float(ref.mean()), "std_ref_cv": float(ref.std() / ref.mean()),
            "r_std16_ref": _r(std(out16["variance"]), ref), "r_std128_ref": _r(maps[128], ref),
            "r_std16_err": _r(std(out16["variance"]), err), "r_stdref_err": _r(ref, err),
            "r_stdref_grad": _r(ref, grad), "r_utrue_err": _r(truth, err),
            "u_pred_over_true": float(np.linalg.norm(u, axis=-1)[mask].mean() / truth.mean()),
            "err_mean": float(err.mean()),
            "dice": bl.score(case, u, None)["dice"]}


COLUMNS = (("log_sigma_mean", "log sigma mean", ".2f"), ("log_sigma_std", "log sigma std", ".3f"),
           ("std_ref_cv", "std CV (ref)", ".3f"), ("r_std16_ref", "r(std16, ref)", ".2f"),
           ("r_std128_ref", "r(std128, ref)", ".2f"), ("r_std16_err", "r(std16, err)", ".2f"),
           ("r_stdref_err", "r(ref, err)", ".2f"), ("r_stdref_grad", "r(ref, |grad f|)", ".2f"),
           ("r_utrue_err", "r(|u_true|, err)", ".2f"), ("u_pred_over_true", "|u_pred|/|u_true|", ".2f"),
           ("err_mean", "err mean px", ".2f"), ("dice", "Dice", ".3f"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="2D checkpoint folder (default: the shipped 2D model)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per case family")
    ap.add_argument("--ref-samples", type=int, default=2048, help="posterior samples of the reference map")
    ap.add_argument("--split", choices=("test", "validation"), default="test",
                    help="validation: only the validation slices (for choosing training options; never the test part)")
    ap.add_argument("--out", default="bench/results/bench_learned_uncertainty.json")
    args = ap.parse_args(argv)
    families = FAMILIES if args.split == "test" else (lambda: bl.test_slice_cases("validation"),)
    ckpt = resolve_model(args.model or str(shipped_model_path(2)), 2)
    lam = (ckpt.config.get("training") or {}).get("loss", {}).get("lam")
    prior_log_sigma = None if lam is None else -0.5 * math.log(lam * 2 * ckpt.model.ndim)
    print(f"model {ckpt.path}; KL-only interior optimum of log sigma: {fmt(prior_log_sigma, '.3f')}", flush=True)
    rows, summary = [], []
    for family_cases in families:
        group = []
        for n, case in enumerate(family_cases()):
            if n >= args.pairs:
                break
            group.append({"family": case["family"], **diagnose(ckpt.model, case, args.ref_samples)})
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in group[-1].items()}),
                  flush=True)
        rows += group
        summary.append({"family": group[0]["family"], "pairs": len(group),
                        **{k: None if group[0][k] is None else float(np.mean([g[k] for g in group]))
                           for k, _, _ in COLUMNS}})
    print(f"\nmeans per family (reference map: {rows[0]['ref_samples']} samples)")
    print_header(("family", "pairs") + tuple(title for _, title, _ in COLUMNS))
    for s in summary:
        print(" | ".join([s["family"], str(s["pairs"])] + [fmt(s[k], spec) for k, _, spec in COLUMNS]), flush=True)
    write_results(args.out, {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args),
                             "model": str(ckpt.path), "kl_only_log_sigma": prior_log_sigma, "summary": summary,
                             "rows": rows})


if __name__ == "__main__":
    main()
