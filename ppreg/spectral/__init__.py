"""FLASH: bandlimited Fourier EPDiff geodesic shooting, adjoint Jacobi gradients, MAP of alpha.

Modules: :mod:`symbols` (band, Laplacian/derivative symbols, L and the prior metric),
:mod:`products` (band <-> grid transforms, truncated products), :mod:`epdiff` (ad, ad†,
shooting), :mod:`energy` (energy, adjoint and autodiff gradients), :mod:`map_alpha` (prior
log-determinant and the alpha step), :mod:`sampling` (v0 ~ N(0, K)), :mod:`descent`
(optimisation loops), :mod:`register` (the ``transform="flash"`` driver).

Source: Wang & Zhang, "Deep Learning for Regularization Prediction in Diffeomorphic Image
Registration" (004 in ../shared/papers), Sec. 2-3.1; Zhang & Fletcher 2015/2019 (FLASH).
"""

from .energy import adjoint_gradient, autodiff_gradient, energy
from .epdiff import ad, ad_dagger, shoot
from .map_alpha import alpha_derivatives, alpha_term, update_alpha
from .register import register_flash
from .sampling import sample_velocity
from .symbols import Band, laplacian, metric, operator

__all__ = ["Band", "ad", "ad_dagger", "adjoint_gradient", "alpha_derivatives", "alpha_term", "autodiff_gradient",
           "energy", "laplacian", "metric", "operator", "register_flash", "sample_velocity", "shoot", "update_alpha"]
