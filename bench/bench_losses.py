"""Per-call time of the warp and the image losses, unbatched and vmapped, value and gradient.

Ops: ``ppreg.warp.warp`` (linear interpolation of a full image at a displaced grid: the fixed grid
under a small affine; value, and value+grad with respect to the coordinates), the diffusion
regulariser on that grid's displacement (value+grad), and the losses ``ssd``, ``ncc``, ``lncc`` (window 5),
``mutual_information`` (32 bins) and ``mind`` (radius 1, dilation 2), each as its value and as
``jax.value_and_grad`` with respect to the warped image.

Data (bundled, real):
  * 2D: PD Border20 (fixed) and PD R10X13Y17 (moving), 257 x 221.
  * 3D: Colin27 T1 at 2 mm, 91 x 109 x 91 (fixed = the volume, moving = the same volume).
The warped images of the loss rows are the moving image under 4 different small affines
(rotation, scaling and shifts of a few voxels); the batched rows ``jax.vmap`` over these 4
(fixed, warped) pairs (warp: 4 (image, coordinate grid) pairs) and report the time per pair.

Timing: each function is jit-compiled ahead of time (``jax.jit(f).lower(*args).compile()``: that
time is ``compile s``), called once to warm up, then timed over several calls with
``block_until_ready``; the median is reported.

Usage: python bench/bench_losses.py [--out bench/results/bench_losses.json] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppreg import losses
from ppreg.data import load_sample
from ppreg.grid import identity_grid
from ppreg.regularizers import diffusion
from ppreg.transforms import apply_matrix, image_center, matrix
from ppreg.warp import warp

from common import print_header, write_results

BATCH = 4
LOSSES = {
    "ssd": losses.ssd,
    "ncc": losses.ncc,
    "lncc (w 5)": lambda f, w: losses.lncc(f, w, window=5),
    "mi (32 bins)": lambda f, w: losses.mutual_information(f, w, bins=32),
    "mind": losses.mind,
}


def affine_coords(shape, k):
    """Moving-image coordinates of the fixed grid under the k-th small affine (a few voxels' motion)."""
    d = len(shape)
    rng = np.random.default_rng(k)
    lin = rng.uniform(-0.04, 0.04, d * d)
    shift = rng.uniform(-4.0, 4.0, d)
    params = jnp.asarray(np.concatenate([lin, shift]), jnp.float32)
    mat = matrix("affine", params, image_center(shape))
    return apply_matrix(mat, identity_grid(shape))


def make_data(dims):
    if dims == "2D":
        fixed = load_sample("BrainProtonDensitySliceBorder20").data
        moving = load_sample("BrainProtonDensitySliceR10X13Y17").data
    else:
        fixed = load_sample("colin27_t1_2mm").data
        moving = fixed
    fixed, moving = jnp.asarray(fixed), jnp.asarray(moving)
    coords = jnp.stack([affine_coords(fixed.shape, k) for k in range(BATCH)])
    # a wrapper, not jax.jit(warp): that would share its compile cache with the timed warp row
    warp_jit = jax.jit(lambda image, c: warp(image, c))
    warped = jnp.stack([warp_jit(moving, c) for c in coords])
    grid = identity_grid(fixed.shape)
    return {
        "shape": tuple(fixed.shape),
        "single": {"image": (moving, coords[0]), "pair": (fixed, warped[0]), "field": (coords[0] - grid,)},
        "batched": {"image": (jnp.stack([moving] * BATCH), coords), "pair": (jnp.stack([fixed] * BATCH), warped),
                    "field": (coords - grid,)},
    }


def functions():
    """(op, kind, mode, fn): kind picks the inputs ("image": (moving, coords), "pair": (fixed, warped),
    "field": (displacement,))."""
    yield "warp", "image", "value", warp
    # the gradient with respect to the coordinates: what every registration step takes through a warp
    yield "warp", "image", "value+grad", jax.value_and_grad(lambda image, c: jnp.sum(warp(image, c)), argnums=1)
    yield "diffusion", "field", "value+grad", jax.value_and_grad(diffusion)
    for name, loss in LOSSES.items():
        yield name, "pair", "value", loss
        yield name, "pair", "value+grad", jax.value_and_grad(loss, argnums=1)


def measure(fn, args, min_reps, budget_s):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    t_start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - t_start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), len(times)


COLUMNS = ("op", "dims", "mode", "compile s", "ms per call", "ms per pair")


def cells(row):
    return [row["op"], row["dims"], row["mode"], f"{row['compile_s']:.2f}", f"{row['ms_per_call']:.2f}",
            f"{row['ms_per_pair']:.2f}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/bench_losses.json")
    ap.add_argument("--quick", action="store_true", help="3 timed calls per row (instead of >= 5 and ~1 s)")
    args = ap.parse_args()
    min_reps, budget_s = (3, 0.0) if args.quick else (5, 1.0)
    rows = []
    print_header(COLUMNS)
    for dims in ("2D", "3D"):
        data = make_data(dims)
        for op, kind, mode, fn in functions():
            for batched in (False, True):
                inputs = data["batched" if batched else "single"][kind]
                f = jax.vmap(fn) if batched else fn
                compile_s, seconds, reps = measure(f, inputs, min_reps, budget_s)
                n = BATCH if batched else 1
                row = {"op": op, "dims": dims, "shape": list(data["shape"]),
                       "mode": mode + (f" vmap {BATCH}" if batched else ""), "batch": n if batched else None,
                       "compile_s": compile_s, "ms_per_call": seconds * 1e3, "ms_per_pair": seconds * 1e3 / n,
                       "reps": reps}
                rows.append(row)
                print(" | ".join(cells(row)), flush=True)
    write_results(args.out, {"rows": rows}, quick=args.quick)


if __name__ == "__main__":
    main()
