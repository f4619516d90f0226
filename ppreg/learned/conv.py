"""Applying an ``eqx.nn.Conv`` fast on XLA's CPU backend: a 3D convolution as a sum of 2D convolutions.

XLA's CPU backend runs 3D convolutions with few channels several times slower than the same work
as 2D convolutions (measured on 2 cores, 2026-12-06: a 3x3x3 convolution of 2 -> 8 channels on
96 x 112 x 96 voxels takes 1.2 s as one 3D convolution and 0.2 s as three 2D ones; bench/README.md,
"3D convolutions on CPU"). A 3D convolution is a sum over the depth taps ``a`` of 2D convolutions,
with the output depth as the batch:

    out[:, i] = sum_a conv2d(x[:, s_d i + a d_d - p_d], w[:, :, a])          (s: stride, d: dilation)

:func:`apply` does that for 3D convolutions on CPU and calls the module itself everywhere else
(2D, GPU/TPU, grouped or non-zero padding modes). The parameters stay those of ``eqx.nn.Conv``, so
checkpoints are unchanged.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax


def apply(conv: eqx.nn.Conv, x: jnp.ndarray) -> jnp.ndarray:
    """``conv(x)``, as depth-batched 2D convolutions for a 3D convolution on the CPU backend.

    Args:
        conv: an ``eqx.nn.Conv``.
        x: float32 ``(in_channels, *spatial)`` (unbatched, Equinox's layout).

    Returns:
        float32 ``(out_channels, *spatial_out)``, equal to ``conv(x)`` up to float32 rounding.

    Raises:
        ValueError: as ``conv(x)`` (wrong channel count or rank).
    """
    if (conv.num_spatial_dims != 3 or conv.groups != 1 or conv.padding_mode != "ZEROS"
            or isinstance(conv.padding, str) or jax.default_backend() != "cpu"):
        return conv(x)
    if x.ndim != 4 or x.shape[0] != conv.in_channels:
        raise ValueError(f"conv input must be ({conv.in_channels}, D, H, W), got shape {x.shape}")
    return _depth_batched(conv, x)


def _depth_batched(conv: eqx.nn.Conv, x: jnp.ndarray) -> jnp.ndarray:
    (pd0, pd1), pad_hw = conv.padding[0], tuple(conv.padding[1:])
    (sd, *stride_hw), (dd, *dilation_hw) = conv.stride, conv.dilation
    taps = conv.weight.shape[2]
    xp = jnp.pad(x, ((0, 0), (pd0, pd1), (0, 0), (0, 0)))
    depth = (xp.shape[1] - dd * (taps - 1) - 1) // sd + 1
    out = None
    for a in range(taps):
        start = a * dd
        planes = jnp.moveaxis(xp[:, start:start + sd * (depth - 1) + 1:sd], 1, 0)  # (depth, C, H, W)
        y = lax.conv_general_dilated(planes, conv.weight[:, :, a], tuple(stride_hw), pad_hw,
                                     rhs_dilation=tuple(dilation_hw), dimension_numbers=("NCHW", "OIHW", "NCHW"))
        out = y if out is None else out + y
    out = jnp.moveaxis(out, 0, 1)  # (O, depth, H', W')
    return out + conv.bias if conv.use_bias else out
