"""3D deformable accuracy and time: Colin27 (2 mm) under a known smooth diffeomorphism.

The case of issue 3. The moving image is the bundled Colin27 T1 at 2 mm with its AAL labels.
The fixed image is the moving image warped by ``u_true = exp(v_true)``, with ``v_true`` a
cubic B-spline field with random coefficients every 8 voxels (16 mm), scaled so that the
largest displacement inside the brain is 6 mm; the fixed labels are the moving labels warped
by nearest neighbour.

Per seed and loss, ``ppreg.register(fixed, moving, transform="svf", loss=...)`` runs twice
(first call with compile, second warm). The script reports:
- mean AAL Dice before and after;
- displacement RMSE against ``u_true`` in mm, over the brain mask;
- folding voxels (det J <= 0).

Peer figures quoted in issue 3 for such cases (2 CPU cores):
- ANTs SyN (CC): Dice 0.968 / 0.28 mm in 265 s;
- dipy SyN (CC): 0.966 / 0.34 mm in 18.7 s;
- SimpleITK diffeomorphic demons: 0.942 / 0.59 mm in 4.6 s;
- before registration: 0.823 / 2.11 mm.

With ``--peers``, the installed peers of ``bench/peers.py`` (ANTsPy, dipy, SimpleITK: the
``bench`` extra) run the same case in the same process, scored the same way, with their time
as a ratio to ppreg's warm time.

With ``--dense``, ``transform="dense"`` (a free displacement field by optax Adam and by
L-BFGS, diffusion-regularised) runs the same case with the first loss.

Usage: python bench/bench_svf.py [--seeds 0 1 2] [--losses lncc ssd] [--dense] [--peers [NAME ...]]
       [--out bench/results/bench_svf.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from ppreg import register
from ppreg.data import load_sample
from ppreg.bspline import control_grid_shape, displacement
from ppreg.grid import identity_grid
from ppreg.metrics import field_rmse, folding, mean_dice
from ppreg.svf import exp as svf_exp
from ppreg.warp import interpolate_nearest, warp

from common import print_header, timed_twice, write_results
from peers import PEERS, available

SPACING_MM = 2.0


def bspline_velocity(key, shape, spacing: int = 8):
    """Cubic B-spline velocity ``(*shape, 3)`` in voxels: standard normal coefficients every ``spacing`` voxels."""
    return displacement(jax.random.normal(key, control_grid_shape(shape, spacing) + (3,)), shape, spacing)


def deformed_case(image, labels, v, max_mm: float, clean: str = "moving", spacing_mm: float = SPACING_MM):
    """A known-answer pair from a clean image and labels and a velocity ``v`` (voxels, rescaled here).

    ``v`` is scaled so that the largest displacement of ``exp(v)`` inside the brain (``labels > 0``)
    is ``max_mm`` (voxels of ``spacing_mm``). ``clean="moving"``: the fixed image is the clean one warped by ``exp(v)``, so the
    true displacement is ``u_true = exp(v)``. ``clean="fixed"``: the moving image is the warped one,
    so ``u_true = exp(-v)``, the inverse map. Deformed labels are warped by nearest neighbour.

    Returns:
        (fixed, moving, fixed_labels, moving_labels, u_true, brain): numpy arrays; ``brain`` is the
        clean image's brain mask, on the fixed grid when ``clean="fixed"``.
    """
    if clean not in ("moving", "fixed"):
        raise ValueError(f"clean must be 'moving' or 'fixed', got {clean!r}")
    shape = image.shape
    brain = np.asarray(labels) > 0
    for _ in range(3):  # rescale until the largest displacement inside the brain is max_mm
        u_true = svf_exp(v, steps=6)
        v = v * (max_mm / spacing_mm) / float(np.max(np.linalg.norm(np.asarray(u_true)[brain], axis=-1)))
    u_true = svf_exp(v, steps=6)
    pts = identity_grid(shape) + u_true
    deformed, deformed_labels = np.asarray(warp(image, pts)), np.asarray(interpolate_nearest(labels, pts))
    image, labels = np.asarray(image), np.asarray(labels)
    if clean == "moving":
        return deformed, image, deformed_labels, labels, np.asarray(u_true), brain
    return image, deformed, labels, deformed_labels, np.asarray(svf_exp(-v, steps=6)), brain


def make_case(seed: int, max_mm: float = 6.0):
    """(fixed, moving, fixed_labels, moving_labels, u_true, brain mask) for one seed."""
    moving = jnp.asarray(load_sample("colin27_t1_2mm").data)
    labels = jnp.asarray(load_sample("colin27_aal_2mm").data).astype(jnp.int32)
    return deformed_case(moving, labels, bspline_velocity(jax.random.key(seed), moving.shape), max_mm)


def score(case, u, spacing_mm: float = SPACING_MM) -> dict:
    """Dice, RMSE against the true field (voxels of ``spacing_mm``) and folding of a displacement ``u`` on ``case``."""
    fixed, moving, fixed_labels, labels, u_true, brain = case
    warped_labels = np.asarray(interpolate_nearest(jnp.asarray(labels), identity_grid(labels.shape) + u))
    spacing = [spacing_mm] * 3
    return {
        "dice_before": mean_dice(fixed_labels, labels), "dice_after": mean_dice(fixed_labels, warped_labels),
        "rmse_before_mm": field_rmse(np.zeros_like(u_true), u_true, spacing=spacing, mask=brain)["mm"],
        "rmse_after_mm": field_rmse(u, u_true, spacing=spacing, mask=brain)["mm"],
        "folding_voxels": folding(u)["voxels"],
    }


def run(seed: int, loss: str, case=None, transform: str = "svf", optimizer: str = "adam") -> dict:
    case = make_case(seed) if case is None else case
    fixed, moving = case[0], case[1]
    r, first, warm = timed_twice(lambda: register(fixed, moving, transform=transform, loss=loss, optimizer=optimizer))
    method = f"ppreg svf ({loss})" if transform == "svf" else f"ppreg dense ({loss}, {optimizer})"
    return {"seed": seed, "method": method, "loss": loss, "shape": list(fixed.shape),
            **score(case, r.displacement()), "time_first_s": first, "time_warm_s": warm,
            "compile_s": max(first - warm, 0.0), "iterations": r.iterations}


def run_peer(seed: int, name: str, fn, case) -> dict:
    u, seconds = fn(case[0], case[1])
    return {"seed": seed, "method": name, "shape": list(case[0].shape), **score(case, u),
            "time_first_s": seconds, "time_warm_s": seconds}


COLUMNS = ("seed", "method", "Dice before", "Dice after", "RMSE before mm", "RMSE after mm", "folding", "time s (1st)",
           "time s (warm)", "time / ppreg")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--losses", nargs="+", default=["lncc", "ssd"])
    ap.add_argument("--peers", nargs="*", default=None, choices=list(PEERS),
                    help="also run these installed peers (no names: all but the slow ANTs SyN (CC))")
    ap.add_argument("--dense", action="store_true",
                    help="also run transform='dense' (optax Adam and L-BFGS) with the first loss")
    ap.add_argument("--out", default="bench/results/bench_svf.json")
    args = ap.parse_args()
    peers = {} if args.peers is None else available(args.peers or [n for n in PEERS if n != "ANTs SyN (CC)"])
    print_header(COLUMNS)
    rows = []
    for seed in args.seeds:
        case = make_case(seed)
        reference = None
        for loss in args.losses:
            rows.append(run(seed, loss, case))
            reference = reference or rows[-1]["time_warm_s"]
            print_row(rows[-1], reference)
        for optimizer in ("adam", "lbfgs") if args.dense else ():
            rows.append(run(seed, args.losses[0], case, transform="dense", optimizer=optimizer))
            print_row(rows[-1], reference)
        for name, fn in peers.items():
            rows.append(run_peer(seed, name, fn, case))
            print_row(rows[-1], reference)
    write_results(args.out, {"rows": rows})


def print_row(row, reference):
    ratio = f"{row['time_warm_s'] / reference:.2f}" if reference else "-"
    print(" | ".join([str(row["seed"]), row["method"], f"{row['dice_before']:.3f}", f"{row['dice_after']:.3f}",
                      f"{row['rmse_before_mm']:.2f}", f"{row['rmse_after_mm']:.2f}", str(row["folding_voxels"]),
                      f"{row['time_first_s']:.1f}", f"{row['time_warm_s']:.1f}", ratio]), flush=True)


if __name__ == "__main__":
    main()
