"""Per-level optimisers, one module per method; the names are re-exported here (``optim.run_level``).

- :mod:`~ppreg.optim.linear`: Gauss-Newton / Levenberg-Marquardt for SSD with linear transforms
  (forward-compositional, Taiello et al. 2024, Algorithm 1), and the level description
  (:class:`Level`) the secure drivers share;
- :mod:`~ppreg.optim.bspline`: Gauss-Newton-CG for the cubic B-spline FFD on SSD, L-BFGS on the other losses;
- :mod:`~ppreg.optim.descent`: regular-step gradient descent for any loss (mi, ncc), linear;
- :mod:`~ppreg.optim.svf`: the demons-style stationary-velocity loop;
- :mod:`~ppreg.optim.dense`: dense displacement by optax.
"""

from .bspline import bspline_objective, bspline_step, run_bspline_lbfgs_level, run_bspline_level
from .dense import DENSE_OPTIMIZERS, dense_objective, halfway_displacement, run_dense_level
from .descent import (descent_points, descent_step, level_values, parameter_scales, run_level_descent,
                      steepest_descent_images)
from .linear import (Level, Terms, fixed_level, local_terms, make_level, moving_level, product_term, run_level,
                     sample_indices, update, warp_terms)
from .svf import run_svf_level

__all__ = ["DENSE_OPTIMIZERS", "Level", "Terms", "bspline_objective", "bspline_step", "dense_objective",
           "descent_points", "descent_step", "fixed_level", "halfway_displacement", "level_values", "local_terms",
           "make_level", "moving_level", "parameter_scales", "product_term", "run_bspline_lbfgs_level",
           "run_bspline_level", "run_dense_level", "run_level", "run_level_descent", "run_svf_level", "sample_indices",
           "steepest_descent_images", "update", "warp_terms"]
