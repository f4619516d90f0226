"""The alpha-predicting CNN of Wang & Zhang (004, Sec. 3.2): a two-stream regression network.

Given a source ``S`` and a target ``T`` image, :class:`AlphaCNN` predicts ``ln alpha``, the log of
FLASH's smoothness weight (``L = (alpha A + gamma)^p``, :mod:`ppreg.spectral`), so the predicted
``alpha = exp(output)`` is positive by construction. It is trained against the marginal-posterior
estimate ``alpha_MAP`` (:func:`ppreg.spectral.evidence.estimate_alpha`; data in
:mod:`ppreg.learned.alpha_data`) with the L2 loss ``mean((H(S, T; W) - ln alpha_MAP)^2)`` and
weight decay on the kernel weights (``Reg(W)`` of Sec. 3.2; :func:`make_optimizer`,
:func:`train_step`).

Architecture (Sec. 3.2, Fig. 2)::

    S -> [conv k, BN, PReLU, maxpool 2] x 4 --\\
                                               concat -> [conv k, BN, PReLU] x 3 -> avg pool -> dense -> ln alpha
    T -> [conv k, BN, PReLU, maxpool 2] x 4 --/

- Each stream has its own weights (``streams[0]`` reads ``S``, ``streams[1]`` reads ``T``);
  convolutions are ``kernel_size``-wide (paper: 5), "same"-padded, He-normal initialised (Sec. 4);
  max pooling is 2 per axis with floor, so a side ``n`` becomes ``n // 16`` (100 -> 6; 128 -> 8).
- The fusion channel concatenates the two feature maps and applies three blocks without pooling
  (the paper's fusion blocks are "convolutional blocks"; with pooling a 100 x 100 input would
  shrink to nothing), then a *global* average pool and a dense layer. The paper puts the fully
  connected layer before the average pooling; a per-voxel linear map and an average commute, so
  the two orders are the same function, and this one accepts any input size.
- Batch normalisation is the paper's: in training (``train=True``) each channel is normalised
  with the mean and (biased) variance over the batch and the spatial axes, and the running
  averages ``r <- (1 - m) r + m batch`` (``m = 0.1``, PyTorch's convention) are returned as new
  statistics; at inference the running averages are used. The running statistics are plain
  array fields of the module (no ``eqx.nn.State``), so :func:`ppreg.learned.save` /
  :func:`ppreg.learned.load` keep them with the weights; :func:`train_step` leaves them out of
  the optimiser (no gradient, no weight decay) and writes the batch's statistics back.
- Sec. 3.2 says four 2x pools take 128^3 to 16^3; four pools give 8^3 (three would give 16^3).
  We follow "four convolutional blocks" per stream, each with a pool.

Layout: images float32 ``(*spatial)`` for one pair or ``(B, *spatial)`` for a batch (values as the
registration sees them, e.g. in [0, 1]); every spatial side at least ``2**4 = 16``. The output is
float32 ``()`` or ``(B,)`` in natural-log units of alpha (alpha is dimensionless, as in
:func:`ppreg.spectral.symbols.operator`).

Source: Wang & Zhang, "Deep learning for regularization prediction in diffeomorphic image
registration" (004 in ../shared/papers), Sec. 3.2 and Sec. 4 (He init, Adam 5e-4, batch 16,
weight decay 1e-4).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint
from .checkpoint import register_architecture
from .conv import apply

__all__ = ["AlphaCNN", "BatchNorm", "alpha_loss", "fit_alpha_cnn", "init_optimizer", "make_optimizer", "network_alpha",
           "predict_alpha", "resolve_alpha_model", "shipped_alpha_path", "train_step", "trainable_filter"]

POOLS = 4  # max-pool blocks per stream (Sec. 3.2)
SHIPPED_ALPHA = {2: "alpha_cnn_2d"}  # folders in ppreg/learned/models
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class BatchNorm(eqx.Module):
    """Batch normalisation over ``(B, C, *spatial)`` with running statistics held as array fields.

    Attributes:
        weight, bias: float32 ``(C,)`` affine parameters (trained).
        mean, var: float32 ``(C,)`` running averages (not trained; updated by :func:`train_step`).
    """

    weight: jnp.ndarray
    bias: jnp.ndarray
    mean: jnp.ndarray
    var: jnp.ndarray

    def __init__(self, channels: int):
        self.weight = jnp.ones((channels,), jnp.float32)
        self.bias = jnp.zeros((channels,), jnp.float32)
        self.mean = jnp.zeros((channels,), jnp.float32)
        self.var = jnp.ones((channels,), jnp.float32)

    def __call__(self, x: jnp.ndarray, train: bool):
        """Normalise ``x`` (float32 ``(B, C, *spatial)``).

        Returns:
            ``(y, (mean, var))``: ``y`` like ``x``; the updated running statistics (``train``) or
            the unchanged ones.
        """
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if train:
            axes = (0,) + tuple(range(2, x.ndim))
            mu = jnp.mean(x, axis=axes)
            var = jnp.var(x, axis=axes)
            stats = ((1 - BN_MOMENTUM) * self.mean + BN_MOMENTUM * jax.lax.stop_gradient(mu),
                     (1 - BN_MOMENTUM) * self.var + BN_MOMENTUM * jax.lax.stop_gradient(var))
        else:
            mu, var = self.mean, self.var
            stats = (self.mean, self.var)
        y = (x - mu.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + BN_EPS)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape), stats


class _Block(eqx.Module):
    conv: eqx.nn.Conv
    norm: BatchNorm
    act: eqx.nn.PReLU
    pool: bool = eqx.field(static=True)

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel_size: int, pool: bool, key):
        conv = eqx.nn.Conv(ndim, c_in, c_out, kernel_size=kernel_size, padding=kernel_size // 2, key=key)
        fan_in = c_in * kernel_size**ndim  # He normal (Sec. 4), zero bias
        weight = jax.random.normal(jax.random.fold_in(key, 1), conv.weight.shape, jnp.float32) * math.sqrt(2.0 / fan_in)
        self.conv = eqx.tree_at(lambda c: (c.weight, c.bias), conv, (weight, jnp.zeros_like(conv.bias)))
        self.norm = BatchNorm(c_out)
        self.act = eqx.nn.PReLU(jnp.asarray(0.25, jnp.float32))  # strong float32: no retrace after step 1
        self.pool = bool(pool)

    def __call__(self, x: jnp.ndarray, train: bool):
        y, stats = self.norm(jax.vmap(lambda v: apply(self.conv, v))(x), train)
        y = self.act(y)
        if self.pool:
            nd = y.ndim - 2
            y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 1) + (2,) * nd, (1, 1) + (2,) * nd, "VALID")
        return y, stats


@eqx.filter_jit
def _layers(ndim: int, stream_features: tuple, fusion_features: tuple, k: int, key):
    """The blocks and the head of :class:`AlphaCNN`, built in one compiled program (eager
    construction dispatches dozens of tiny random-number programs: seconds on a CPU)."""
    keys = iter(jax.random.split(key, 2 * len(stream_features) + len(fusion_features) + 1))
    streams = []
    for _ in range(2):
        chans = (1,) + stream_features
        streams.append([_Block(ndim, chans[i], chans[i + 1], k, True, next(keys)) for i in range(len(stream_features))])
    chans = (2 * stream_features[-1],) + fusion_features
    fusion = [_Block(ndim, chans[i], chans[i + 1], k, False, next(keys)) for i in range(len(fusion_features))]
    head = eqx.nn.Linear(fusion_features[-1], 1, key=next(keys))
    return streams, fusion, head


@register_architecture("AlphaCNN")
class AlphaCNN(eqx.Module):
    """Two-stream regression CNN predicting ``ln alpha`` from a (source, target) pair (004 Sec. 3.2).

    Attributes:
        streams: two lists of ``len(stream_features)`` (4) pooling blocks, for source and target.
        fusion: the ``len(fusion_features)`` (3) blocks on the concatenated streams.
        head: dense layer ``fusion_features[-1] -> 1``.
        ndim: 2 or 3.
        min_size: smallest admitted spatial side (``2 ** len(stream_features)``, 16).
    """

    streams: list
    fusion: list
    head: eqx.nn.Linear
    ndim: int = eqx.field(static=True)
    min_size: int = eqx.field(static=True)

    def __init__(self, ndim: int, stream_features=(16, 32, 32, 64), fusion_features=(64, 64, 64),
                 kernel_size: int = 5, log_alpha_init: float = 0.0, *, key):
        """Build the network.

        Args:
            ndim: spatial dimensionality, 2 or 3.
            stream_features: output channels of each stream's pooling blocks (Sec. 3.2: four blocks;
                channel counts are not given in the paper).
            fusion_features: output channels of the fusion blocks (Sec. 3.2: three blocks).
            kernel_size: odd convolution width (Sec. 3.2: 5).
            log_alpha_init: initial bias of the dense output (e.g. the mean ``ln alpha_MAP`` of
                the training split), so training starts at a sensible alpha.
            key: PRNG key for the initial weights.

        Raises:
            ValueError: ``ndim`` not 2 or 3; empty or non-positive feature lists; an even or
                non-positive ``kernel_size``.
        """
        if ndim not in (2, 3):
            raise ValueError(f"AlphaCNN supports 2D and 3D, got ndim={ndim}")
        stream_features = tuple(int(c) for c in stream_features)
        fusion_features = tuple(int(c) for c in fusion_features)
        if not stream_features or not fusion_features or min(stream_features + fusion_features) < 1:
            raise ValueError(f"need non-empty positive channel counts, got stream_features={stream_features}, "
                             f"fusion_features={fusion_features}")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        self.streams, self.fusion, head = _layers(int(ndim), stream_features, fusion_features, int(kernel_size), key)
        self.head = eqx.tree_at(lambda h: h.bias, head, jnp.full((1,), log_alpha_init, jnp.float32))
        self.ndim = int(ndim)
        self.min_size = 2 ** len(stream_features)

    def _blocks(self) -> list:
        return [b for s in self.streams for b in s] + list(self.fusion)

    def check_pair(self, source, target) -> tuple[jnp.ndarray, jnp.ndarray, bool]:
        """Validate a pair and give it a batch axis.

        Args:
            source, target: float ``(*spatial)`` or ``(B, *spatial)``, one shape.

        Returns:
            ``(source, target, batched)``: float32 ``(B, *spatial)`` arrays (``B = 1`` added when
            unbatched) and whether the input had a batch axis.

        Raises:
            ValueError: the shapes differ; the rank is neither ``ndim`` nor ``ndim + 1``; a spatial
                side is below :attr:`min_size`; the batch is empty.
        """
        s_shape, t_shape = jnp.shape(source), jnp.shape(target)
        if s_shape != t_shape:
            raise ValueError(f"source and target must have one shape, got {s_shape} and {t_shape}")
        if len(s_shape) not in (self.ndim, self.ndim + 1):
            raise ValueError(f"AlphaCNN ({self.ndim}D) takes (*spatial) or (B, *spatial) images with "
                             f"{self.ndim} spatial axes, got shape {s_shape}")
        batched = len(s_shape) == self.ndim + 1
        spatial = s_shape[1:] if batched else s_shape
        if min(spatial) < self.min_size:
            raise ValueError(f"AlphaCNN spatial sides must be >= {self.min_size} (four 2x max pools), got {spatial}")
        if batched and s_shape[0] < 1:
            raise ValueError("empty batch")
        source = jnp.asarray(source, jnp.float32)
        target = jnp.asarray(target, jnp.float32)
        if not batched:
            source, target = source[None], target[None]
        return source, target, batched

    def forward(self, source, target, *, train: bool = False):
        """Predict ``ln alpha`` and the batch-norm statistics to keep.

        Args:
            source, target: float32 ``(*spatial)`` or ``(B, *spatial)``, one shape, sides >= 16.
            train: batch statistics (and updated running averages) if True, running averages if False.

        Returns:
            ``(log_alpha, stats)``: float32 ``()`` or ``(B,)``; a list with one ``(mean, var)`` pair
            of float32 ``(C,)`` per block (the order of :func:`_stats_of`), for :func:`train_step`.

        Raises:
            ValueError: as :meth:`check_pair`.
        """
        source, target, batched = self.check_pair(source, target)
        stats = []
        feats = []
        for stream, x in zip(self.streams, (source[:, None], target[:, None])):
            for block in stream:
                x, st = block(x, train)
                stats.append(st)
            feats.append(x)
        x = jnp.concatenate(feats, axis=1)
        for block in self.fusion:
            x, st = block(x, train)
            stats.append(st)
        pooled = jnp.mean(x, axis=tuple(range(2, x.ndim)))  # (B, C)
        out = jax.vmap(self.head)(pooled)[:, 0]
        return (out if batched else out[0]), stats

    def __call__(self, source, target) -> jnp.ndarray:
        """Inference: ``ln alpha`` (float32 ``()`` or ``(B,)``) with the running batch-norm statistics.

        Raises:
            ValueError: as :meth:`check_pair`.
        """
        return self.forward(source, target, train=False)[0]


def _stats_of(model: AlphaCNN) -> list:
    return [(b.norm.mean, b.norm.var) for b in model._blocks()]


def trainable_filter(model: AlphaCNN):
    """Filter spec (pytree of bools like ``model``): True for trained leaves, False for running stats."""
    spec = jax.tree_util.tree_map(eqx.is_inexact_array, model)
    running = lambda m: [x for b in m._blocks() for x in (b.norm.mean, b.norm.var)]  # noqa: E731
    return eqx.tree_at(running, spec, replace=[False] * (2 * len(model._blocks())))


def _decay_mask(params):
    # Reg(W): weight decay on convolution kernels and the dense weight only (ndim >= 2)
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def make_optimizer(learning_rate: float = 5e-4, weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """AdamW with the paper's settings (Sec. 4: Adam, learning rate 5e-4, weight decay 1e-4).

    Weight decay is decoupled (optax.adamw) and applies to the convolution kernels and the dense
    weight, not to biases, batch-norm affine parameters or PReLU slopes.

    Raises:
        ValueError: a non-positive learning rate or a negative weight decay.
    """
    if not learning_rate > 0 or not weight_decay >= 0:
        raise ValueError(f"need learning_rate > 0 and weight_decay >= 0, got {learning_rate}, {weight_decay}")
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=_decay_mask)


def init_optimizer(optimizer: optax.GradientTransformation, model: AlphaCNN):
    """Optimiser state for the trainable leaves of ``model`` (running statistics excluded)."""
    return optimizer.init(eqx.filter(model, trainable_filter(model)))


def alpha_loss(model: AlphaCNN, source, target, alpha, *, train: bool = True):
    """L2 loss on ``ln alpha`` (004 Sec. 3.2, ``Err``): ``mean((H(S, T) - ln alpha)^2)``.

    Args:
        model: the network. source, target: float32 ``(B, *spatial)``. alpha: float ``(B,)`` > 0.
        train: batch statistics (True) or running averages.

    Returns:
        ``(loss, stats)``: float32 scalar; the batch-norm statistics as :meth:`AlphaCNN.forward`.
    """
    pred, stats = model.forward(source, target, train=train)
    return jnp.mean((pred - jnp.log(jnp.asarray(alpha, jnp.float32))) ** 2), stats


@eqx.filter_jit
def train_step(model: AlphaCNN, opt_state, optimizer: optax.GradientTransformation, source, target, alpha):
    """One jitted optimiser step on a batch (L2 loss on ln alpha, batch-norm in training mode).

    Args:
        model: the network. opt_state: from :func:`init_optimizer`. optimizer: from
            :func:`make_optimizer` (a static argument: pass the same object every step).
        source, target: float32 ``(B, *spatial)``, ``B >= 2`` for meaningful batch statistics.
        alpha: float32 ``(B,)`` targets (alpha_MAP, > 0).

    Returns:
        ``(model, opt_state, loss)``: the updated network (new weights and running statistics), the
        new optimiser state and the batch loss before the step (float32 scalar).
    """
    params, rest = eqx.partition(model, trainable_filter(model))

    def loss_fn(p):
        return alpha_loss(eqx.combine(p, rest), source, target, alpha, train=True)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.combine(eqx.apply_updates(params, updates), rest)
    flat = [x for pair in stats for x in pair]
    model = eqx.tree_at(lambda m: [x for b in m._blocks() for x in (b.norm.mean, b.norm.var)], model, flat)
    return model, opt_state, loss


@eqx.filter_jit
def predict_alpha(model: AlphaCNN, source, target) -> jnp.ndarray:
    """Predicted alpha (``exp`` of the network output, inference mode): float32 ``()`` or ``(B,)`` > 0.

    Jitted (one compilation per model structure and input shape).

    Raises:
        ValueError: as :meth:`AlphaCNN.check_pair`.
    """
    return jnp.exp(model(source, target))


def fit_alpha_cnn(model: AlphaCNN, source, target, alpha, *, epochs: int, batch_size: int = 16, seed: int = 0,
                  optimizer: optax.GradientTransformation | None = None, opt_state=None):
    """A plain epoch loop over :func:`train_step` (shuffled mini-batches; the last partial batch dropped).

    Args:
        model: the network. source, target: float32 ``(n, *spatial)``. alpha: float ``(n,)`` > 0.
        epochs: passes over the data. batch_size: pairs per step (>= 2; Sec. 4: 16).
        seed: seed of the shuffling. optimizer: default :func:`make_optimizer` (5e-4, 1e-4).
        opt_state: resume from this state (default: a fresh one).

    Returns:
        ``(model, opt_state, losses)``: losses float32 ``(steps,)``, the batch loss of every step.

    Raises:
        ValueError: ``n`` below ``batch_size``, ``batch_size < 2``, mismatched lengths, or as
            :meth:`AlphaCNN.check_pair`.
    """
    source = np.asarray(source, np.float32)
    target = np.asarray(target, np.float32)
    alpha = np.asarray(alpha, np.float32)
    n = source.shape[0]
    if batch_size < 2 or n < batch_size or target.shape[0] != n or alpha.shape != (n,):
        raise ValueError(f"need batch_size >= 2 and n >= batch_size pairs with (n,) alphas, got batch_size="
                         f"{batch_size}, source {source.shape}, target {target.shape}, alpha {alpha.shape}")
    if np.any(~(alpha > 0)):
        raise ValueError("alpha targets must be positive")
    model.check_pair(source, target)
    optimizer = make_optimizer() if optimizer is None else optimizer
    opt_state = init_optimizer(optimizer, model) if opt_state is None else opt_state
    rng = np.random.default_rng(int(seed))
    losses = []
    for _ in range(int(epochs)):
        perm = rng.permutation(n)
        for lo in range(0, n - batch_size + 1, batch_size):
            idx = perm[lo:lo + batch_size]
            model, opt_state, loss = train_step(model, opt_state, optimizer, source[idx], target[idx], alpha[idx])
            losses.append(float(loss))
    return model, opt_state, np.asarray(losses, np.float32)


def shipped_alpha_path(ndim: int) -> Path:
    """Folder of the AlphaCNN shipped for ``ndim``-D images (2D only: 100 x 100 bull's-eyes, band 15,
    sigma 0.03; ``scripts/train_alpha_cnn.py``).

    Raises:
        ValueError: no shipped model for that dimensionality (3D: pass a trained model).
    """
    if ndim not in SHIPPED_ALPHA:
        raise ValueError(f"no shipped alpha network for {ndim}D images (2D only): pass a trained AlphaCNN "
                         "with --model / alpha_model")
    return Path(str(resources.files("ppreg.learned") / "models" / SHIPPED_ALPHA[ndim]))


def resolve_alpha_model(model, ndim: int) -> checkpoint.Checkpoint:
    """An AlphaCNN checkpoint from ``None`` (the shipped model for ``ndim``), a folder or a checkpoint.

    Raises:
        ValueError: no shipped model for ``ndim``; not an AlphaCNN; built for another dimensionality.
        ppreg.learned.checkpoint.CheckpointError: unreadable or corrupt checkpoint.
    """
    from .register import resolve_model  # lazily: ppreg.learned.register imports the VoxelMorph stack

    return resolve_model(model, ndim, cls=AlphaCNN, shipped=shipped_alpha_path)


def network_alpha(model, source, target, *, band_size: int, sigma: float) -> float:
    """FLASH's alpha predicted by an AlphaCNN for one pair (004 Sec. 3.2), in place of the Laplace
    ``alpha_MAP`` (:func:`ppreg.spectral.evidence.estimate_alpha`).

    alpha_MAP depends on the image grid, the band and the likelihood's sigma, so a network answers
    only for the ones it was trained with (``training["data"]`` of its ``config.json``: shape,
    band_size, noise); the images must be scaled as in training (both over their common maximum
    |intensity|, as :func:`ppreg.spectral.register.register_flash` does).

    Args:
        model: ``None`` (the shipped model for the images' dimensionality), a checkpoint folder or a
            loaded :class:`~ppreg.learned.checkpoint.Checkpoint`.
        source, target: float32 ``(*spatial)`` (S moving, T fixed), one shape.
        band_size, sigma: the FLASH model the alpha is for.

    Returns:
        alpha (float > 0, dimensionless).

    Raises:
        ValueError: as :func:`resolve_alpha_model`; a shape, band or sigma the network was not trained
            for; as :meth:`AlphaCNN.check_pair`.
    """
    ndim = len(np.shape(source))
    ckpt = resolve_alpha_model(model, ndim)
    data = (ckpt.config.get("training") or {}).get("data") or {}
    trained = {"shape": tuple(int(n) for n in data.get("shape", ())), "band_size": data.get("band_size"),
               "sigma": data.get("noise")}
    asked = {"shape": tuple(np.shape(source)), "band_size": int(band_size), "sigma": float(sigma)}
    for name in ("shape", "band_size", "sigma"):
        if trained[name] != asked[name]:
            raise ValueError(f"alpha network {ckpt.path} was trained for {name} {trained[name]}, got {asked[name]} "
                             "(train one for this setting: scripts/train_alpha_cnn.py)")
    return float(predict_alpha(ckpt.model, source, target))
