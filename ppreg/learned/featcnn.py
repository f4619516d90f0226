"""FeatCNN: the Y-shaped feature network of SUITS (Blendowski et al. 2020, Table 1), 2D or 3D.

Two modality-specific *stems* (one per input stream: stream 0 for the fixed image, stream 1 for
the moving image) of two convolutions each, followed by ``shared`` convolutions used by both
streams (Table 1: the last three layers are shared)::

    layer          1        2        3        4        5
    chan in/out    1/16     16/32    32/32    32/32    32/C
    kernel         5        3        3        3        3
    dilation       2        1        1        1        1
    stride         1        2 (*)    2        1        1
    padding        4        1        1        1        1
    inst. norm     yes      yes      yes      yes      no
    activation     ReLU     ReLU     ReLU     ReLU     sigmoid

(*) Table 1 as extracted gives stride 1 to layer 2 and only one stride-2 layer (layer 3), which
would put the output at 1/2 resolution; the text (Sec. 4.2) says the network "downsamples our
input images by a factor of 4" and the displacement is upsampled from every 4th voxel, so this
implementation gives layer 2 stride 2 as well (the last stem layer): output at 1/4 resolution.

Instance normalisation has no learnable affine parameters (PyTorch's ``InstanceNorm3d`` default),
``eps = 1e-5``. ``C`` (``out_channels``) defaults to the channel count of ppreg's MIND-SSC
(:func:`ppreg.losses.mind_ssc`): 12 in 3D (the paper's 12 sigmoid outputs), 4 in 2D, so the
network can be pre-trained as a MIND replicator (:func:`ppreg.learned.suits.mind_replicator_loss`).

**Parameter count.** With Table 1 as written (layers 1-2 per stream, 3-5 shared) the 3D network
has 97,484 parameters (2 x 15,872 in the stems + 65,740 shared), not the "about 155k" of Sec. 4.2.
The paper's number is matched by sharing only the last layer (``shared=1``: 152,844, -1.4 %) and
roughly by sharing nothing (163,224); Table 1 and the sentence "the last 3 layers are shared"
agree with each other, so ``shared=3`` is the default (:func:`parameter_count` gives the formula).

Layout: images are ``(*spatial)`` float32, features channel-last ``(*spatial // 4, C)`` in
``(0, 1)`` like :func:`ppreg.losses.mind_ssc`; unbatched (batch with ``jax.vmap``). Spatial
sizes must be divisible by 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import equinox as eqx

from .checkpoint import register_architecture
from .conv import apply

__all__ = ["FeatCNN", "LAYERS", "count_parameters", "parameter_count"]

# (kernel, dilation, stride, padding) of the five layers (Table 1; stride of layer 2 see module doc)
LAYERS = ((5, 2, 1, 4), (3, 1, 2, 1), (3, 1, 2, 1), (3, 1, 1, 1), (3, 1, 1, 1))
STREAMS = 2
FACTOR = 4  # output resolution: 1/FACTOR of the input on every axis
IN_EPS = 1e-5


def _channels(in_channels: int, features, out_channels: int) -> list[tuple[int, int]]:
    chans = (in_channels,) + tuple(features) + (out_channels,)
    return list(zip(chans[:-1], chans[1:]))


def parameter_count(ndim: int, *, in_channels: int = 1, features=(16, 32, 32, 32), out_channels: int | None = None,
                    shared: int = 3) -> int:
    """Trainable parameters of :class:`FeatCNN` by formula (weights + biases; instance norms have none).

    Args:
        ndim: 2 or 3.
        in_channels, features, out_channels, shared: as :class:`FeatCNN`.

    Returns:
        The count: ``sum over layers of copies * (c_in * c_out * k^ndim + c_out)``, ``copies = 2`` for
        the per-stream layers and 1 for the shared ones. 3D, Table 1: 97,484.
    """
    out_channels = _default_out(ndim) if out_channels is None else out_channels
    total = 0
    for i, ((c_in, c_out), (k, _, _, _)) in enumerate(zip(_channels(in_channels, features, out_channels), LAYERS)):
        copies = 1 if i >= len(LAYERS) - shared else STREAMS
        total += copies * (c_in * c_out * k**ndim + c_out)
    return total


def _default_out(ndim: int) -> int:
    return 2 * ndim * (ndim - 1)  # MIND-SSC channels: 12 in 3D, 4 in 2D


@register_architecture("FeatCNN")
class FeatCNN(eqx.Module):
    """The Y-shaped FeatCNN of SUITS (Blendowski et al. 2020, Table 1 and Sec. 4.2).

    Attributes:
        stems: ``STREAMS`` (2) lists of the per-stream convolutions (layers ``1 .. 5 - shared``);
            stream 0 reads the fixed image, stream 1 the moving image.
        trunk: the ``shared`` convolutions used by both streams.
        ndim: 2 or 3.
        out_channels: feature channels ``C``.
        multiple: input sizes must be divisible by this (4).
    """

    stems: list
    trunk: list
    ndim: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    multiple: int = eqx.field(static=True)

    def __init__(self, ndim: int, in_channels: int = 1, features=(16, 32, 32, 32), out_channels: int | None = None,
                 shared: int = 3, *, key):
        """Build the layers (Equinox's default initialisation).

        Args:
            ndim: spatial dimensionality, 2 or 3.
            in_channels: channels of each input image (1: a grey-value image).
            features: output channels of layers 1-4 (Table 1: 16, 32, 32, 32).
            out_channels: channels of the sigmoid output; ``None``: MIND-SSC's (12 in 3D, 4 in 2D).
            shared: how many trailing layers both streams share, 0 to 5 (Table 1: 3).
            key: PRNG key for the initial weights.

        Raises:
            ValueError: ``ndim`` not 2 or 3, ``features`` not 4 positive ints, ``out_channels`` or
                ``in_channels`` < 1, ``shared`` outside 0..5.
        """
        if ndim not in (2, 3):
            raise ValueError(f"FeatCNN supports 2D and 3D, got ndim={ndim}")
        features = tuple(int(c) for c in features)
        out_channels = _default_out(ndim) if out_channels is None else int(out_channels)
        if len(features) != len(LAYERS) - 1 or min(features) < 1 or out_channels < 1 or int(in_channels) < 1:
            raise ValueError(f"need 4 positive feature counts and positive in/out channels, got features={features}, "
                             f"in_channels={in_channels}, out_channels={out_channels}")
        if not 0 <= int(shared) <= len(LAYERS):
            raise ValueError(f"shared must be 0..{len(LAYERS)}, got {shared}")
        shared = int(shared)
        n_stem = len(LAYERS) - shared
        chans = _channels(int(in_channels), features, out_channels)
        keys = iter(jax.random.split(key, STREAMS * n_stem + shared))

        def conv(i, k):
            (c_in, c_out), (size, dil, stride, pad) = chans[i], LAYERS[i]
            return eqx.nn.Conv(ndim, c_in, c_out, kernel_size=size, stride=stride, padding=pad, dilation=dil, key=k)

        self.stems = [[conv(i, next(keys)) for i in range(n_stem)] for _ in range(STREAMS)]
        self.trunk = [conv(i, next(keys)) for i in range(n_stem, len(LAYERS))]
        self.ndim, self.out_channels, self.multiple = int(ndim), out_channels, FACTOR

    @property
    def in_channels(self) -> int:
        """Channels of each input image."""
        return (self.stems[0] + self.trunk)[0].in_channels

    def __call__(self, image: jnp.ndarray, stream: int) -> jnp.ndarray:
        """Features of one image through one stream.

        Args:
            image: float32 ``(*spatial)`` (or ``(*spatial, in_channels)`` when ``in_channels > 1``),
                z-normalised or in [0, 1]; every spatial size divisible by 4.
            stream: 0 (fixed-image stem) or 1 (moving-image stem); a Python int (static).

        Returns:
            float32 ``(*spatial // 4, out_channels)`` in ``(0, 1)``, channel-last.

        Raises:
            ValueError: ``stream`` not 0/1, wrong rank or channel count, sizes not divisible by 4.
        """
        if stream not in (0, 1):
            raise ValueError(f"stream must be 0 (fixed) or 1 (moving), got {stream!r}")
        image = jnp.asarray(image)
        if self.in_channels == 1 and image.ndim == self.ndim:
            x = image[None]
        elif image.ndim == self.ndim + 1 and image.shape[-1] == self.in_channels:
            x = jnp.moveaxis(image, -1, 0)
        else:
            raise ValueError(f"FeatCNN input must be {self.ndim}D (*spatial) with {self.in_channels} channel(s) "
                             f"(trailing axis if > 1), got shape {image.shape}")
        spatial = x.shape[1:]
        if any(n % self.multiple or n < self.multiple for n in spatial):
            raise ValueError(f"FeatCNN spatial sizes must be positive multiples of {self.multiple}, got {spatial}")
        layers = self.stems[stream] + self.trunk
        for i, conv in enumerate(layers):
            x = apply(conv, x)
            if i < len(layers) - 1:
                mean = jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)
                var = jnp.var(x, axis=tuple(range(1, x.ndim)), keepdims=True)
                x = jax.nn.relu((x - mean) * jax.lax.rsqrt(var + IN_EPS))
        return jnp.moveaxis(jax.nn.sigmoid(x), 0, -1)

    def pair(self, fixed: jnp.ndarray, moving: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Features of a pair: ``(self(fixed, 0), self(moving, 1))``.

        Args:
            fixed, moving: float32 ``(*spatial)``, the same shape, sizes divisible by 4.

        Returns:
            Two float32 ``(*spatial // 4, out_channels)``.

        Raises:
            ValueError: the shapes differ, or as :meth:`__call__`.
        """
        if jnp.shape(fixed) != jnp.shape(moving):
            raise ValueError(f"fixed and moving must have one shape, got {jnp.shape(fixed)} and {jnp.shape(moving)}")
        return self(fixed, 0), self(moving, 1)


def count_parameters(model: eqx.Module) -> int:
    """Number of scalars in the array leaves of ``model`` (works on ``eqx.filter_eval_shape`` skeletons)."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, lambda x: hasattr(x, "shape") and hasattr(x, "dtype")))
    total = 0
    for leaf in leaves:
        size = 1
        for n in leaf.shape:
            size *= int(n)
        total += size
    return total
