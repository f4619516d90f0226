"""The UNet of VoxelMorph-diff (Dalca et al. 2019, Sec. 2.3), in 2D or 3D, as an Equinox module.

A full-resolution convolution, ``len(encoder) - 1`` stride-2 convolutions (the paper: four, 32 then
64 filters), then ``len(encoder) - 2`` upsampling steps (nearest neighbour, concatenated with the
encoder's feature map of the same size) so that the output lies at *half* resolution: the paper
predicts the velocity "at every two voxels". Every convolution is 3x3(x3) with LeakyReLU(0.2), as
in VoxelMorph.

Layout: the network works channels-first, ``(C, *spatial)``, unbatched (Equinox's convention);
batch with ``jax.vmap``. Spatial sizes must be divisible by ``2 ** (len(encoder) - 1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import equinox as eqx

from .conv import apply

LEAK = 0.2  # LeakyReLU slope of VoxelMorph


def _conv(ndim: int, c_in: int, c_out: int, stride: int, key) -> eqx.nn.Conv:
    return eqx.nn.Conv(ndim, c_in, c_out, kernel_size=3, stride=stride, padding=1, key=key)


def _upsample(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour x2 on every spatial axis of ``(C, *spatial)``."""
    for axis in range(1, x.ndim):
        x = jnp.repeat(x, 2, axis=axis)
    return x


class UNet(eqx.Module):
    """Encoder-decoder with skip connections whose output lies at half resolution.

    Attributes:
        encoder: ``len(encoder_features)`` convolutions: the first at full resolution, then stride 2.
        decoder: ``len(decoder_features)`` convolutions: one before each of the ``levels - 1``
            upsamplings, the rest at half resolution.
        ndim: 2 or 3 spatial axes.
        multiple: input sizes must be divisible by this (``2 ** levels``).
    """

    encoder: list
    decoder: list
    ndim: int = eqx.field(static=True)
    multiple: int = eqx.field(static=True)

    def __init__(self, ndim: int, in_channels: int = 2, encoder_features=(16, 32, 32, 32, 32),
                 decoder_features=(32, 32, 32, 32), *, key):
        """Build the layers.

        Args:
            ndim: spatial dimensionality, 2 or 3.
            in_channels: input channels (2: fixed and moving).
            encoder_features: output channels of the full-resolution convolution, then of each
                stride-2 convolution (at least 2 entries: one downsampling).
            decoder_features: output channels of the decoder convolutions; needs at least
                ``len(encoder_features) - 1`` entries (one per upsampling, then at least one at
                half resolution). The last entry is the number of output channels.
            key: PRNG key for the initial weights (Equinox's default initialisation).

        Raises:
            ValueError: unsupported ``ndim`` or feature lists of the wrong length.
        """
        if ndim not in (2, 3):
            raise ValueError(f"UNet supports 2D and 3D, got ndim={ndim}")
        enc, dec = tuple(int(c) for c in encoder_features), tuple(int(c) for c in decoder_features)
        levels = len(enc) - 1
        if levels < 1 or len(dec) < levels or min(enc + dec) < 1:
            raise ValueError(f"need >= 2 encoder and >= len(encoder) - 1 decoder feature counts (all positive), "
                             f"got encoder {enc} and decoder {dec}")
        keys = iter(jax.random.split(key, len(enc) + len(dec)))
        self.encoder = [_conv(ndim, c_in, c_out, 1 if i == 0 else 2, next(keys))
                        for i, (c_in, c_out) in enumerate(zip((in_channels,) + enc[:-1], enc))]
        skips = enc[1:-1][::-1]  # encoder maps met on the way up (1/2^(levels-1) ... 1/2)
        c_in, self.decoder = enc[-1], []
        for i, c_out in enumerate(dec):
            self.decoder.append(_conv(ndim, c_in, c_out, 1, next(keys)))
            c_in = c_out + (skips[i] if i < len(skips) else 0)
        self.ndim, self.multiple = ndim, 2**levels

    @property
    def out_channels(self) -> int:
        """Channels of the half-resolution output."""
        return self.decoder[-1].out_channels

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Run the network.

        Args:
            x: float32 ``(in_channels, *spatial)``, each spatial size divisible by ``multiple``.

        Returns:
            float32 ``(out_channels, *spatial // 2)`` (after the last LeakyReLU).

        Raises:
            ValueError: wrong rank or sizes not divisible by ``multiple``.
        """
        if x.ndim != self.ndim + 1 or any(n % self.multiple for n in x.shape[1:]):
            raise ValueError(f"UNet input must be (C, *spatial) with {self.ndim} spatial axes divisible by "
                             f"{self.multiple}, got shape {x.shape}")
        feats = []
        for conv in self.encoder:
            x = jax.nn.leaky_relu(apply(conv, x), LEAK)
            feats.append(x)
        skips = feats[1:-1][::-1]
        for i, conv in enumerate(self.decoder):
            x = jax.nn.leaky_relu(apply(conv, x), LEAK)
            if i < len(skips):
                x = jnp.concatenate([_upsample(x), skips[i]], axis=0)
        return x
