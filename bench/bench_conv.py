"""3D convolutions on XLA's CPU backend: Equinox's native 3D convolution vs ppreg.learned.conv's depth-batched 2D.

For every convolution of the shipped 3D VoxelMorph-diff network (``ppreg/learned/models/vxm_diff_3d``),
on the input it sees for a 96 x 112 x 96 volume (forward) and for a 48^3 training crop (gradient of a
scalar of the output with respect to the weights and the input), the warm median time of ``conv(x)``
and of :func:`ppreg.learned.conv.apply`, their largest difference, and the whole network's forward
pass and training-crop gradient as ppreg runs them now (depth-batched on CPU).

Usage: python bench/bench_conv.py [--repeats 5] [--out bench/results/bench_conv.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from common import print_header, time_jax, write_results  # noqa: E402

from ppreg.learned.conv import apply  # noqa: E402
from ppreg.learned.register import resolve_model  # noqa: E402
from ppreg.learned.unet import LEAK, _upsample  # noqa: E402

FULL, CROP = (96, 112, 96), (48, 48, 48)


def layer_inputs(model, x):
    """``(name, conv, input)`` of every convolution of the VxmDiff ``model`` on the input ``x`` (2, *spatial)."""
    unet, out, feats = model.unet, [], []
    for i, conv in enumerate(unet.encoder):
        out.append((f"encoder {i}", conv, x))
        x = jax.nn.leaky_relu(apply(conv, x), LEAK)
        feats.append(x)
    skips = feats[1:-1][::-1]
    for i, conv in enumerate(unet.decoder):
        out.append((f"decoder {i}", conv, x))
        x = jax.nn.leaky_relu(apply(conv, x), LEAK)
        if i < len(skips):
            x = jnp.concatenate([_upsample(x), skips[i]], axis=0)
    return out + [("mu head", model.mu_head, x), ("log-sigma head", model.log_sigma_head, x)]


def _scalar(f):
    return lambda conv, x: jnp.sum(jnp.sin(f(conv, x)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_conv.json"))
    args = ap.parse_args()
    model = resolve_model(None, 3).model
    native, ours = (lambda c, x: c(x)), apply
    fwd = {k: eqx.filter_jit(f) for k, f in (("native", native), ("ours", ours))}
    grad = {k: eqx.filter_jit(jax.grad(_scalar(f), argnums=(0, 1))) for k, f in (("native", native), ("ours", ours))}
    rows = []
    columns = ["layer", "pass", "input", "native 3D ms", "depth-batched 2D ms", "speed-up", "max |diff|"]
    print_header(columns)
    for shape, kind, fns in ((FULL, "forward", fwd), (CROP, "gradient", grad)):
        x = jax.random.uniform(jax.random.key(0), (2, *shape))
        for name, conv, h in layer_inputs(model, x):
            t_native = time_jax(fns["native"], conv, h, repeats=args.repeats)["warm_s"]
            t_ours = time_jax(fns["ours"], conv, h, repeats=args.repeats)["warm_s"]
            diff = float(jnp.max(jnp.abs(fwd["native"](conv, h) - fwd["ours"](conv, h))))
            rows.append({"layer": name, "pass": kind, "input": list(h.shape), "native_s": t_native,
                         "depth_batched_s": t_ours, "max_abs_diff": diff})
            print(f"{name} | {kind} | {h.shape} | {t_native * 1e3:.1f} | {t_ours * 1e3:.1f} | "
                  f"{t_native / t_ours:.1f}x | {diff:.1e}", flush=True)
    totals = {}
    for kind in ("forward", "gradient"):
        n = sum(r["native_s"] for r in rows if r["pass"] == kind)
        o = sum(r["depth_batched_s"] for r in rows if r["pass"] == kind)
        totals[kind] = {"native_s": n, "depth_batched_s": o}
        print(f"all convolutions | {kind} | | {n * 1e3:.1f} | {o * 1e3:.1f} | {n / o:.1f}x |")
    x = jax.random.uniform(jax.random.key(0), (2, *FULL))
    xc = jax.random.uniform(jax.random.key(0), (2, *CROP))
    net = time_jax(eqx.filter_jit(lambda m, a, b: m(a, b)), model, x[0], x[1], repeats=args.repeats)["warm_s"]
    net_grad = time_jax(eqx.filter_jit(eqx.filter_grad(lambda m, a, b: sum(jnp.sum(jnp.sin(t)) for t in m(a, b)))),
                           model, xc[0], xc[1], repeats=args.repeats)["warm_s"]
    print(f"whole network as ppreg runs it: forward {FULL} {net * 1e3:.0f} ms, gradient {CROP} {net_grad * 1e3:.0f} ms")
    write_results(args.out, {"rows": rows, "totals": totals, "network_forward_s": net, "network_gradient_s": net_grad,
                             "full_shape": list(FULL), "crop_shape": list(CROP)})


if __name__ == "__main__":
    main()
