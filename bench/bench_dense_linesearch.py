"""L-BFGS line-search evaluations of the dense objective: averaged over voxels vs summed (DESIGN.md item 40).

``ppreg.optim.run_dense_level`` hands optax's L-BFGS (zoom line search) the dense objective summed over
voxels. This script shows why: on the first held-out case of ``bench/bench_validation.py`` (Colin27 at
2 mm, 91 x 109 x 91, ``noise s4 5mm / moving clean``, seed 100), from a zero field at full resolution, it
runs the same L-BFGS iterations on the half-way lncc objective (diffusion 0.3, smoothing 3 voxels: the
dense defaults) scaled by 1 (the mean) and by the voxel count (the sum), and reports per scaling the line
search's steps per iteration (each step evaluates the objective and its gradient), their total, the
objective reached (mean units) and the wall time (compile apart).

Usage: python bench/bench_dense_linesearch.py [--iterations 20] [--out bench/results/bench_dense_linesearch.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
from bench_validation import FAMILIES, HELD_OUT_SEEDS, make_case  # noqa: E402
from common import write_results  # noqa: E402

from ppreg.grid import smooth_field  # noqa: E402
from ppreg.losses import lncc  # noqa: E402
from ppreg.optim import dense_objective  # noqa: E402
from ppreg.options import DENSE_DIFFUSION, DENSE_SIGMA  # noqa: E402


def run(objective, shape, scale: float, iterations: int) -> dict:
    """``iterations`` L-BFGS steps on ``scale * objective(G_sigma w)`` from ``w = 0``."""
    def scaled(w):
        return scale * objective(smooth_field(w, DENSE_SIGMA["lbfgs"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(scaled)

    @jax.jit
    def step(w, state):
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=scaled)
        return optax.apply_updates(w, updates), state

    w = jnp.zeros(shape, jnp.float32)
    state = opt.init(w)
    jax.block_until_ready(step(w, state))  # compile
    steps, t0 = [], time.perf_counter()
    for _ in range(iterations):
        w, state = step(w, state)
        steps.append(int(optax.tree_utils.tree_get(state, "num_linesearch_steps")))
    seconds = time.perf_counter() - t0
    final = float(objective(smooth_field(w, DENSE_SIGMA["lbfgs"])))
    return {"scale": scale, "linesearch_steps": steps, "evaluations": sum(steps), "objective": final,
            "time_s": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--out", default="bench/results/bench_dense_linesearch.json")
    args = ap.parse_args()
    fixed, moving = (jnp.asarray(x, jnp.float32) for x in make_case(FAMILIES[0], HELD_OUT_SEEDS[0])[:2])
    fixed, moving = fixed / fixed.max(), moving / moving.max()
    objective = partial(dense_objective, moving=moving, fixed=fixed, loss_fn=lncc, regularization=DENSE_DIFFUSION,
                        symmetric=True)
    rows = [dict(run(objective, fixed.shape + (3,), scale, args.iterations), name=name)
            for name, scale in (("mean", 1.0), ("sum", float(fixed.size)))]
    print("objective | line-search steps per iteration | evaluations | objective reached | time s")
    for r in rows:
        print(f"{r['name']} | {r['linesearch_steps']} | {r['evaluations']} | {r['objective']:.6f} | {r['time_s']:.1f}")
    write_results(args.out, {"case": [FAMILIES[0], HELD_OUT_SEEDS[0]], "iterations": args.iterations, "rows": rows})


if __name__ == "__main__":
    main()
