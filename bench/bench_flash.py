"""FLASH (ppreg.spectral): accuracy, time and memory; the tables of issue 6.

Cases (``--cases``, default all):
- ``gradient``: adjoint Jacobi-field gradient vs autodiff of the same discrete energy on the
  100 x 100 bull's-eye (cosine similarity, relative error), for 10 and 40 Euler steps.
- ``bullseye``: 100 x 100 bull's-eye (``ppreg.spectral.sampling.bullseye``) deformed by
  velocities drawn from the prior at alpha = 3, 6, 11 (band 15, 3 seeds each). Reports
  (a) the MAP alpha given the drawn velocity (the prior's own estimate: checks Eq. 7 and the
  log-determinant), (b) the joint MAP of Algorithm 1 from the image pair (alpha starts at
  1; L-BFGS in the V metric, alpha Newton steps after 20% of the iterations), (c) the marginal
  (Laplace) MAP of ``ppreg.spectral.evidence`` per pair and (d) pooled over the 3 pairs of each
  alpha (one shared alpha, vmapped fits); folding and forward-backward consistency of the
  synthetic maps. The targets carry Gaussian noise of the likelihood's sigma (0.03), as the
  model says data do.
- ``itk``: fixed BrainProtonDensitySliceBorder20, moving BSplined10 (MSE before 1309.5),
  ``ppreg.register(transform="flash")`` with the defaults, called twice (compile apart);
  MSE, folding, forward-backward consistency.
- ``3d``: Colin27 (ch2, with skull) -> MNI152 2009a T1, both resampled (trilinear) onto one
  128^3 grid at 1.5 mm centred at MNI (0, -17, 18) mm; intensities divided by each image's
  99.5th percentile and clipped to [0, 1]. An affine stage (``transform="affine"``, SSD) runs
  first; then FLASH (``transform="flash"``, band 15, ``FLASH_3D`` options) and the dense SVF
  (``transform="svf"``, ssd, defaults) register the affinely aligned image, each in a fresh
  process, twice (the second call is the time reported; ``compile s`` the difference), with
  the process's peak resident memory (affine stage included). Accuracy: MSE and NCC to the
  fixed image, folding voxels.

- ``mpc``: the ITK pair by FLASH clear and under MPC (``register(..., transform="flash",
  secure="mpc")``, :mod:`ppreg.secure.protocols.flash`): displacement RMSE vs CLEAR, traffic.

Usage: python bench/bench_flash.py [--cases gradient bullseye itk mpc 3d] [--out bench/results/bench_flash.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import timed_twice, write_results

ALPHAS = (3.0, 6.0, 11.0)


def _inverse_consistency(v0, band, alpha):
    from ppreg.spectral import metric, shoot
    from ppreg.spectral.epdiff import forward_map
    from ppreg.spectral.products import to_image
    from ppreg.svf import compose

    path, u1 = shoot(jnp.asarray(v0, jnp.complex64), jnp.asarray(metric(band, alpha), jnp.float32), band)
    u_inv, u_fwd = to_image(u1, band), to_image(forward_map(path, band), band)
    m = max(2, min(band.shape) // 16)
    r = jnp.linalg.norm(compose(u_fwd, u_inv), axis=-1)[(slice(m, -m),) * band.ndim]
    return float(jnp.sqrt(jnp.mean(r**2))), float(jnp.sqrt(jnp.mean(jnp.sum(u_inv**2, axis=-1))))


def case_gradient():
    from ppreg.spectral import Band, adjoint_gradient, autodiff_gradient, metric, sample_velocity
    from ppreg.spectral.sampling import bullseye, synthesize_pair

    band = Band((100, 100), 15)
    source = bullseye(band.shape)
    target, v_true = synthesize_pair(jax.random.key(0), source, band, 3.0)
    lsym = jnp.asarray(metric(band, 3.0), jnp.float32)
    v0 = 0.5 * v_true + 0.3 * sample_velocity(jax.random.key(1), band, 3.0)
    rows = []
    for steps in (10, 40):
        g_adj = jax.jit(lambda c: adjoint_gradient(c, source, target, lsym, band, sigma=0.03, steps=steps)[2])(v0)
        g_adj = g_adj * lsym[..., None]
        g_ad = jax.jit(lambda c: autodiff_gradient(c, source, target, lsym, band, sigma=0.03, steps=steps))(v0)
        cos = float(jnp.sum(jnp.real(jnp.conj(g_adj) * g_ad)) / (jnp.linalg.norm(g_adj) * jnp.linalg.norm(g_ad)))
        rel = float(jnp.linalg.norm(g_adj - g_ad) / jnp.linalg.norm(g_ad))
        rows.append({"steps": steps, "cosine": cos, "relative_error": rel})
    print("\n| Euler steps | cosine (adjoint, autodiff) | relative error |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['steps']} | {r['cosine']:.5f} | {r['relative_error']:.4f} |")
    return rows


NOISE = 0.03  # the bull's-eye targets carry the likelihood's own noise (sigma = 0.03)


def case_bullseye(iterations=150, rounds=8, seeds=(0, 1, 2)):
    from ppreg.grid import identity_grid
    from ppreg.metrics import folding
    from ppreg.spectral import Band, update_alpha
    from ppreg.spectral.descent import fit_lbfgs
    from ppreg.spectral.evidence import estimate_alpha
    from ppreg.warp import interpolate
    from ppreg.spectral.register import flash_displacement
    from ppreg.spectral.sampling import bullseye, synthesize_pair

    band = Band((100, 100), 15)
    source = bullseye(band.shape)
    synth = jax.jit(synthesize_pair, static_argnums=2)
    zeros = jnp.zeros(band.coeff_shape, jnp.complex64)
    opts = dict(band=band, sigma=NOISE, iterations=iterations)
    rows, pooled = [], []
    for alpha in ALPHAS:
        targets = []
        for seed in seeds:
            target, v_true = synth(jax.random.key(seed), source, band, alpha)
            target = target + NOISE * jax.random.normal(jax.random.key(1000 + seed), target.shape)
            targets.append(target)
            est = jnp.float32(1.0)
            for _ in range(6):
                est = update_alpha(est, v_true, band)
            _, a_joint, _, _, _ = fit_lbfgs(zeros, 1.0, source, target, estimate_alpha=True,  # as before: 300 its
                                            alpha_after=2 * iterations // 5, **{**opts, "iterations": 2 * iterations})
            t0 = time.perf_counter()
            v, a_map, _, _, alphas = estimate_alpha(zeros, 1.0, source, target, rounds=rounds, **opts)
            a_map = float(a_map)
            sec = time.perf_counter() - t0
            u_true = flash_displacement(v_true, band, alpha=alpha)
            u = flash_displacement(v, band, alpha=a_map)
            warped = interpolate(source, identity_grid(band.shape) + u)
            ic, rms_u = _inverse_consistency(v_true, band, alpha)
            rows.append({"alpha": alpha, "seed": seed, "alpha_from_v_true": float(est),
                         "alpha_joint_map": float(a_joint), "alpha_laplace": a_map,
                         "alpha_rounds": [float(a) for a in alphas], "time_s": sec,
                         "max_u_true": float(np.abs(u_true).max()),
                         "folding_true": folding(u_true)["voxels"], "folding_map": folding(u)["voxels"],
                         "mse_before": float(jnp.mean((source - target) ** 2)),
                         "mse_after": float(jnp.mean((warped - target) ** 2)),
                         "inverse_consistency_px": ic, "rms_u_true": rms_u})
        batch = len(seeds)
        t0 = time.perf_counter()
        _, a_pool, _, _, _ = estimate_alpha(jnp.zeros((batch,) + band.coeff_shape, jnp.complex64), 1.0,
                                            jnp.broadcast_to(source, (batch,) + band.shape), jnp.stack(targets),
                                            rounds=rounds, **opts)
        pooled.append({"alpha": alpha, "pairs": batch, "alpha_laplace_pooled": float(a_pool),
                       "time_s": time.perf_counter() - t0})
    print("\n| alpha | seed | alpha from v_true | joint MAP (Alg. 1) | Laplace MAP | Laplace / true | max u px | "
          "folding (true, MAP) | MSE before | MSE after | phi o phi^-1 RMS px | time s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['alpha']:g} | {r['seed']} | {r['alpha_from_v_true']:.2f} | {r['alpha_joint_map']:.2f} | "
              f"{r['alpha_laplace']:.2f} | {r['alpha_laplace'] / r['alpha']:.2f} | {r['max_u_true']:.2f} | "
              f"{r['folding_true']}, {r['folding_map']} | {r['mse_before']:.4f} | {r['mse_after']:.5f} | "
              f"{r['inverse_consistency_px']:.3f} | {r['time_s']:.1f} |")
    print("\n| alpha | pairs | pooled Laplace MAP | pooled / true | time s |")
    print("| --- | --- | --- | --- | --- |")
    for r in pooled:
        print(f"| {r['alpha']:g} | {r['pairs']} | {r['alpha_laplace_pooled']:.2f} | "
              f"{r['alpha_laplace_pooled'] / r['alpha']:.2f} | {r['time_s']:.1f} |")
    return {"pairs": rows, "pooled": pooled}


def case_itk():
    from ppreg import register
    from ppreg.data import load_sample
    from ppreg.metrics import folding
    from ppreg.spectral import Band

    fixed = load_sample("BrainProtonDensitySliceBorder20").data
    moving = load_sample("BrainProtonDensitySliceBSplined10").data
    r, first, warm = timed_twice(lambda: register(fixed, moving, transform="flash"))
    u = r.displacement()
    ic, rms_u = _inverse_consistency(r.params, Band(fixed.shape, r.band_size), r.alpha)
    row = {"mse_before": float(np.mean((fixed - moving) ** 2)), "mse_after": r.final_loss, "iterations": r.iterations,
           "folding": folding(u)["voxels"], "min_det": None, "time_first_s": first, "time_warm_s": warm,
           "compile_s": max(first - warm, 0.0), "inverse_consistency_px": ic, "rms_u": rms_u,
           "max_u": float(np.abs(u).max())}
    print("\n| case | iter | MSE before | MSE after | folding px | phi o phi^-1 RMS px | 1st call s | 2nd call s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| ITK PD BSplined10 -> Border20, flash | {row['iterations']} | {row['mse_before']:.1f} | "
          f"{row['mse_after']:.2f} | {row['folding']} | {ic:.3f} | {first:.2f} | {warm:.2f} |")
    return row


def case_mpc():
    """The ITK pair by FLASH (defaults; L-BFGS and FLASH's step-controlled descent) clear and under
    MPC (party2 holds the fixed image), both with the public power-of-two intensity scale:
    displacement RMSE, MSE, time, traffic."""
    from ppreg import register
    from ppreg.data import load_sample
    from ppreg.options import scale_exponent

    fixed = load_sample("BrainProtonDensitySliceBorder20").data
    moving = load_sample("BrainProtonDensitySliceBSplined10").data
    scale = 2.0 ** max(scale_exponent(fixed), scale_exponent(moving))
    rows = []
    print("\n| ITK BSplined10 -> Border20 | optimizer | iter | MSE | RMSE vs CLEAR px | time s (warm) "
          "| MB/it p1 / p2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for optimizer in ("lbfgs", "flash"):
        clear, _, clear_s = timed_twice(lambda: register(
            fixed, moving, transform="flash", flash_options={"intensity_scale": scale, "optimizer": optimizer}))
        secure, _, secure_s = timed_twice(lambda: register(fixed, moving, transform="flash", secure="mpc",
                                                           flash_options={"optimizer": optimizer}))
        rmse = float(np.sqrt(np.mean(np.sum((clear.displacement() - secure.displacement()) ** 2, -1))))
        row = {"optimizer": optimizer, "iterations": [clear.iterations, secure.iterations],
               "mse": [clear.final_loss, secure.final_loss], "rmse_vs_clear_px": rmse,
               "time_warm_s": [clear_s, secure_s],
               "mb_per_iteration": {p: secure.bytes_per_iteration[p] / 1e6 for p in ("party1", "party2")},
               "offline_mb": {p: secure.bytes[p]["offline"] / 1e6 for p in ("party1", "party2")}}
        rows.append(row)
        print(f"| flash CLEAR | {optimizer} | {clear.iterations} | {clear.final_loss:.2f} | - | {clear_s:.2f} | - |")
        print(f"| flash PPIR(MPC) | {optimizer} | {secure.iterations} | {secure.final_loss:.2f} | {rmse:.2e} | "
              f"{secure_s:.2f} | {row['mb_per_iteration']['party1']:.3f} / {row['mb_per_iteration']['party2']:.3f} |")
    return rows


GRID_SHAPE, GRID_MM, GRID_CENTRE = (128, 128, 128), 1.5, (0.0, -17.0, 18.0)


def brain_pair():
    """(fixed MNI152, moving Colin27) float32 128^3 at 1.5 mm, intensities in [0, 1]."""
    import nibabel as nib
    from scipy import ndimage

    root = "../shared/data" if not __file__.startswith("/") else __file__.rsplit("/bench/", 1)[0] + "/../shared/data"
    out = []
    for path in ("mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "colin27/ch2.nii.gz"):
        img = nib.load(f"{root}/{path}")
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in GRID_SHAPE], indexing="ij"), -1).reshape(-1, 3)
        world = (idx - (np.asarray(GRID_SHAPE) - 1) / 2.0) * GRID_MM + np.asarray(GRID_CENTRE)
        vox = (np.linalg.inv(img.affine) @ np.c_[world, np.ones(len(world))].T)[:3]
        data = ndimage.map_coordinates(np.asarray(img.dataobj, np.float32), vox, order=1, cval=0.0)
        data = data.reshape(GRID_SHAPE)
        out.append(np.clip(data / np.percentile(data, 99.5), 0.0, 1.0).astype(np.float32))
    return out[0], out[1]


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


FLASH_3D = {"alpha": 100.0, "sigma": 0.1}  # 3D: sigma 0.1 (0.03 folds on this pair); band 15


def run_3d_one(method: str) -> dict:
    from ppreg import register
    from ppreg.metrics import folding

    fixed, moving = brain_pair()
    t0 = time.perf_counter()
    lin = register(fixed, moving, transform="affine")
    affine_s = time.perf_counter() - t0
    aligned = lin.warped
    kwargs = ({"transform": "flash", "flash_options": FLASH_3D} if method == "flash"
              else {"transform": "svf", "loss": "ssd"})
    r, first, warm = timed_twice(lambda: register(fixed, aligned, **kwargs))
    u = r.displacement()
    return {"method": method, "shape": list(fixed.shape), "mse_before": float(np.mean((fixed - moving) ** 2)),
            "mse_affine": float(np.mean((fixed - aligned) ** 2)), "mse_after": r.final_loss,
            "ncc_before": _ncc(fixed, moving), "ncc_affine": _ncc(fixed, aligned), "ncc_after": _ncc(fixed, r.warped),
            "folding": folding(u)["voxels"], "iterations": r.iterations, "affine_s": affine_s,
            "time_first_s": first, "time_warm_s": warm, "compile_s": max(first - warm, 0.0),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "options": FLASH_3D if method == "flash" else {}}


def case_3d():
    rows = []
    for method in ("flash", "svf"):
        out = subprocess.run([sys.executable, __file__, "--one-3d", method], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n| 3D Colin27 -> MNI152, 128^3 at 1.5 mm (after affine) | iter | MSE before / affine / after | "
          "NCC before / affine / after | folding vox | 1st call s | 2nd call s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['iterations']} | {r['mse_before']:.4f} / {r['mse_affine']:.4f} / "
              f"{r['mse_after']:.4f} | {r['ncc_before']:.3f} / {r['ncc_affine']:.3f} / {r['ncc_after']:.3f} | "
              f"{r['folding']} | {r['time_first_s']:.1f} | {r['time_warm_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["gradient", "bullseye", "itk", "mpc", "3d"])
    parser.add_argument("--out", default="bench/results/bench_flash.json")
    parser.add_argument("--one-3d", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_3d:
        print(json.dumps(run_3d_one(args.one_3d)))
        return
    cases = {"gradient": case_gradient, "bullseye": case_bullseye, "itk": case_itk, "mpc": case_mpc, "3d": case_3d}
    payload = {name: cases[name]() for name in args.cases}
    write_results(args.out, payload, cases=args.cases)


if __name__ == "__main__":
    main()
