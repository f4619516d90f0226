"""The coarse-to-fine driver of the dense deformable models (svf velocity, dense displacement), shared
by the clear and the secure (two-party lncc) registrations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .grid import downsample, level_shape, upsample_field
from .options import check_finite
from .result import LevelReport


def coarse_to_fine_core(fixed_u, moving_u, levels, iterations, run_level, shape=None, on_level=None):
    """The loop of :func:`coarse_to_fine` without the host-side reports: traceable (``jax.jit`` /
    ``jax.vmap`` of a whole registration, :func:`ppreg.batch.register_batch`) when ``run_level`` is.

    Args:
        fixed_u, moving_u, levels, iterations, run_level, shape: as :func:`coarse_to_fine`.
        on_level: ``on_level(li, factor, field)`` after each level (eager runs: the finiteness check),
            or ``None``.

    Returns:
        ``(field (*shape, d) in full-resolution voxels, losses)``: ``losses`` one array per level.
    """
    shape = fixed_u.shape if shape is None else tuple(shape)
    field, losses_all = None, []
    for li, (factor, count) in enumerate(zip(levels, level_counts(levels, iterations))):
        coarse = level_shape(shape, factor)
        if field is None:
            field = jnp.zeros(coarse + (len(shape),), jnp.float32)
        else:
            field = upsample_field(field, shape, levels[li - 1], factor)
        level_field, losses = run_level(li, field / factor, downsample(moving_u, factor),
                                        None if fixed_u is None else downsample(fixed_u, factor), int(count))
        field = level_field * factor
        losses_all.append(losses)
        if on_level is not None:
            on_level(li, factor, field)
    return field, losses_all


def level_counts(levels, iterations) -> tuple[int, ...]:
    """Iterations per level: ``iterations`` (one count for every level, or a sequence of one per level)."""
    return tuple(iterations) if isinstance(iterations, (tuple, list)) else (iterations,) * len(levels)


def level_reports(shape, levels, iterations, losses) -> list[LevelReport]:
    """The :class:`LevelReport` of each level of a dense model run (``losses``: one array per level)."""
    return [LevelReport(int(f), level_shape(tuple(shape), f), int(c), int(np.prod(level_shape(tuple(shape), f))),
                        np.asarray(loss)) for f, c, loss in zip(levels, level_counts(levels, iterations), losses)]


def coarse_to_fine(fixed_u, moving_u, levels, iterations, run_level, shape=None):
    """Coarse-to-fine driver of the dense models (svf velocity, dense displacement).

    The field is carried in full-resolution voxels between levels; ``run_level(li, field,
    moving, fixed, iterations)`` gets the field in level voxels and the level images (``fixed``
    ``None`` when ``fixed_u`` is: a remote party2 holds it, ``shape`` its grid) and returns
    ``(field, losses)``.

    Returns:
        ``(field (*shape, d) in full-resolution voxels, reports)``.

    Raises:
        FloatingPointError: the field is not finite after a level (:func:`ppreg.options.check_finite`).
    """
    shape = fixed_u.shape if shape is None else tuple(shape)
    field, losses = coarse_to_fine_core(fixed_u, moving_u, levels, iterations, run_level, shape,
                                        on_level=lambda li, factor, f: check_finite(f, li, factor))
    return field, level_reports(shape, levels, iterations, losses)
