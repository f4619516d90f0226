"""The coarse-to-fine driver of the dense deformable models (svf velocity, dense displacement), shared
by the clear and the secure (two-party lncc) registrations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .grid import downsample, level_shape, upsample_field
from .options import check_finite
from .result import LevelReport


def coarse_to_fine(fixed_u, moving_u, levels, iterations, run_level, shape=None):
    """Coarse-to-fine driver of the dense models (svf velocity, dense displacement).

    The field is carried in full-resolution voxels between levels; ``run_level(li, field,
    moving, fixed, iterations)`` gets the field in level voxels and the level images (``fixed``
    ``None`` when ``fixed_u`` is: a remote party2 holds it, ``shape`` its grid) and returns
    ``(field, losses)``.

    Returns:
        ``(field (*shape, d) in full-resolution voxels, reports)``.
    """
    shape = fixed_u.shape if shape is None else tuple(shape)
    field, reports = None, []
    counts = tuple(iterations) if isinstance(iterations, (tuple, list)) else (iterations,) * len(levels)
    for li, (factor, count) in enumerate(zip(levels, counts)):
        coarse = level_shape(shape, factor)
        if field is None:
            field = jnp.zeros(coarse + (len(shape),), jnp.float32)
        else:
            field = upsample_field(field, shape, levels[li - 1], factor)
        level_field, losses = run_level(li, field / factor, downsample(moving_u, factor),
                                        None if fixed_u is None else downsample(fixed_u, factor), int(count))
        field = level_field * factor
        reports.append(LevelReport(int(factor), coarse, int(count), int(np.prod(coarse)), np.asarray(losses)))
        check_finite(field, li, factor)
    return field, reports
