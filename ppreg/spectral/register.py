"""FLASH registration driver: ``register_flash(fixed, moving, ...) -> ppreg.register.Result``.

Intensity scaling: both images are divided by their common maximum absolute intensity (a
public power of two is not needed in the clear), so intensities lie in ``[0, 1]`` for
non-negative images and ``sigma`` is a fraction of that maximum (default 0.03, 004 Sec. 4).
The image term is summed over voxels, so ``sigma`` and the prior normalisation
(:func:`ppreg.spectral.symbols.metric`) together set the regularisation; ``alpha`` sets its
smoothness scale. Images are treated as periodic for the velocity (torus, 004 Sec. 2.2) and
the source is resampled with zero outside it.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import jax.numpy as jnp
import numpy as np

from .descent import fit, fit_lbfgs, fit_optax
from .epdiff import shoot
from .evidence import estimate_alpha as estimate_alpha_laplace
from .products import to_image
from .symbols import Band, metric

OPTIMIZERS = ("lbfgs", "flash", "adam")
ESTIMATORS = {False: "none", None: "none", True: "laplace", "laplace": "laplace", "joint": "joint",
              "network": "network"}
LAPLACE_ROUNDS = 5
DEFAULTS = {  # register(transform="flash") defaults; alpha and sigma chosen on the ITK 2D pair (module docstring)
    "band_size": 15, "alpha": 100.0, "gamma": 1.0, "power": 3, "sigma": 0.03, "steps": 10, "optimizer": "lbfgs",
    "step_size": 0.2, "estimate_alpha": False,
}


def flash_displacement(v0, band: Band, *, alpha: float, gamma: float = 1.0, power: int = 3, steps: int = 10,
                       integrator: str = "euler") -> np.ndarray:
    """Dense displacement ``phi_1^-1(x) - x`` on the image grid of the band (float32 ``(*shape, d)``, voxels)."""
    lsym = jnp.asarray(metric(band, float(alpha), gamma=gamma, power=power), jnp.float32)
    _, u1 = shoot(jnp.asarray(v0, jnp.complex64), lsym, band, steps=steps, integrator=integrator)
    return np.asarray(to_image(u1, band))


def register_flash(fixed, moving, *, band_size: int = 15, alpha: float = 100.0, gamma: float = 1.0, power: int = 3,
                   sigma: float = 0.03, steps: int = 10, iterations: int = 150, step_size: float = 0.2,
                   optimizer: str = "lbfgs", estimate_alpha: bool = False, intensity_scale: float | None = None,
                   session=None, alpha_model=None):
    """Register ``moving`` (source S) to ``fixed`` (target T) by FLASH geodesic shooting.

    Args:
        fixed, moving: float32 arrays of the same 2D or 3D shape (checked by the caller).
        band_size: odd band size T per axis (FLASH's 16 -> 15).
        alpha, gamma, power: ``L = (alpha A + gamma)^power`` (start value of alpha when estimated).
        sigma: noise standard deviation as a fraction of the common maximum intensity.
        steps: Euler steps of the shooting.
        iterations: maximum descent iterations.
        step_size: initial FLASH step (``eps``) or Adam learning rate.
        optimizer: ``"lbfgs"`` (L-BFGS in the V metric, default), ``"flash"`` (gradient descent
            with FLASH's step control) or ``"adam"`` (optax, fixed alpha).
        estimate_alpha: ``False`` (alpha fixed), ``"laplace"`` (or ``True``: the marginal MAP of
            :mod:`ppreg.spectral.evidence`, lbfgs optimizer, bands of at most 4096 unknowns;
            ``iterations`` per round, 5 rounds) or ``"joint"`` (004 Algorithm 1 as published:
            biased high where the images leave motion unobserved; flash or lbfgs optimizer) or
            ``"network"`` (alpha predicted from the scaled pair by an AlphaCNN, 004 Sec. 3.2:
            :func:`ppreg.learned.alpha_cnn.network_alpha`; then a fit at that alpha; clear only).
        alpha_model: ``estimate_alpha="network"``: an AlphaCNN checkpoint folder (``None``: the
            shipped 2D model, trained on 100 x 100 bull's-eyes, band 15, sigma 0.03).
        intensity_scale: divide both images by this (default: their common maximum |intensity|).
        session: a :class:`~ppreg.secure.mpc.shares.TwoPartySession`: party2 holds ``fixed`` and the
            target terms of every energy evaluation run under MPC
            (:class:`ppreg.secure.protocols.flash.Party2Target`); or party1's
            :class:`~ppreg.secure.session.SecureSession` with party2 in another process (``fixed`` is
            ``None``, ``intensity_scale`` required: :class:`ppreg.secure.protocols.flash.Party1Target`);
            lbfgs and flash optimizers.

    Returns:
        ``(v0, alpha, iterations, objectives, displacement, seconds)``: complex64 coefficients
        ``band.coeff_shape``, float alpha, int, float32 objective history, float32
        ``(*shape, d)`` displacement of ``phi_1^-1`` (voxels), wall time.

    Raises:
        ValueError: unknown optimizer, shapes differ, bad band size (:class:`Band`),
            estimate_alpha with adam (or laplace with another optimizer than lbfgs), an unknown
            estimate_alpha, an all-zero pair; alpha_model without estimate_alpha="network";
            "network" with a session, or as :func:`ppreg.learned.alpha_cnn.network_alpha` (no model
            for 3D, a shape, band or sigma the network was not trained for).
    """
    start = time.perf_counter()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown FLASH optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    estimator = ESTIMATORS.get(estimate_alpha)
    if estimator is None:
        raise ValueError(f"unknown estimate_alpha {estimate_alpha!r}; expected False, True, 'laplace', 'joint' or "
                         "'network'")
    if alpha_model is not None and estimator != "network":
        raise ValueError("alpha_model is the network of estimate_alpha='network'")
    if estimator == "network" and session is not None:
        raise ValueError("estimate_alpha='network' reads both images: clear registration only")
    if estimator == "joint" and optimizer == "adam":
        raise ValueError("estimate_alpha='joint' needs the flash or lbfgs optimizer (004 Algorithm 1)")
    if estimator == "laplace" and optimizer != "lbfgs":
        raise ValueError(f"estimate_alpha='laplace' fits with the lbfgs optimizer, got {optimizer!r}")
    if fixed is None and (session is None or intensity_scale is None):
        raise ValueError("without the fixed image (party2 in another process) FLASH needs a session and the "
                         "public intensity_scale")
    moving = jnp.asarray(moving, jnp.float32)
    fixed = jnp.zeros_like(moving) if fixed is None else jnp.asarray(fixed, jnp.float32)
    if fixed.shape != moving.shape:
        raise ValueError(f"FLASH needs fixed and moving on the same grid, got {fixed.shape} and {moving.shape}")
    if not (alpha > 0 and gamma > 0 and sigma > 0):
        raise ValueError(f"alpha, gamma and sigma must be positive, got {alpha}, {gamma}, {sigma}")
    band = Band(tuple(fixed.shape), band_size)
    peak = float(jnp.maximum(jnp.max(jnp.abs(fixed)), jnp.max(jnp.abs(moving))))
    if peak == 0.0:
        raise ValueError("both images are all zero: nothing to register")
    scale = peak if intensity_scale is None else float(intensity_scale)
    source, target = moving / scale, fixed / scale
    if estimator == "network":
        from ..learned.alpha_cnn import network_alpha

        alpha = network_alpha(alpha_model, source, target, band_size=band_size, sigma=sigma)
    v0 = jnp.zeros(band.coeff_shape, jnp.complex64)
    opts = dict(band=band, gamma=float(gamma), power=int(power), sigma=float(sigma), steps=int(steps),
                iterations=int(iterations))
    party2 = nullcontext()
    if session is not None:  # party1 never holds the target: the image terms come from the protocol
        from ..secure.protocols.flash import RemoteImageTerm, image_target

        if optimizer == "adam":
            raise ValueError("secure FLASH runs the lbfgs or flash optimizer")
        party2, opts["image_term"] = image_target(session, target, band), RemoteImageTerm(band)
        target = jnp.zeros_like(target)
    if estimator == "laplace":
        with party2:
            v0, alpha_out, its, fs, _ = estimate_alpha_laplace(v0, float(alpha), source, target,
                                                               rounds=LAPLACE_ROUNDS, **opts)
            its = int(its)
        fs = np.asarray(fs)[:its]
    elif optimizer in ("flash", "lbfgs"):
        with party2:
            v0, alpha_out, its, fs, _ = (fit if optimizer == "flash" else fit_lbfgs)(
                v0, float(alpha), source, target, step_size=step_size, estimate_alpha=estimator == "joint",
                alpha_after=int(iterations) // 5, **opts)
            its = int(its)
        fs = np.asarray(fs)[:its]
    else:
        v0, fs = fit_optax(v0, float(alpha), source, target, learning_rate=step_size, **opts)
        alpha_out, its, fs = alpha, int(iterations), np.asarray(fs)
    alpha_out = float(alpha_out)
    u = flash_displacement(v0, band, alpha=alpha_out, gamma=gamma, power=power, steps=steps)
    if not (np.all(np.isfinite(u)) and bool(jnp.all(jnp.isfinite(v0)))):
        raise FloatingPointError("FLASH registration diverged (non-finite velocity); lower step_size or raise alpha")
    return np.asarray(v0), alpha_out, its, fs, u, time.perf_counter() - start


def _result_class():
    """``FlashResult``: :class:`ppreg.register.Result` plus the FLASH model (imported lazily: no cycle)."""
    global _FLASH_RESULT
    if _FLASH_RESULT is None:
        from dataclasses import dataclass

        from ..result import Result

        @dataclass(frozen=True)
        class FlashResult(Result):
            """:class:`ppreg.register.Result` of ``transform="flash"``.

            ``params`` holds the complex64 initial velocity coefficients ``band.coeff_shape``
            (:mod:`ppreg.spectral.symbols`); the displacement is recomputed by shooting with
            the stored model. Extra attributes: alpha (estimated when asked), gamma, power,
            steps, band_size, sigma, objectives (float32 history).
            """

            alpha: float = 1.0
            gamma: float = 1.0
            power: int = 3
            steps: int = 10
            band_size: int = 15
            sigma: float = 0.03
            objectives: np.ndarray = None

            def _deformable_part(self):
                """Dense displacement of ``phi_1^-1`` on the fixed grid: float32 ``(*shape, d)``, voxels (before
                ``matrix``, the header start, when the moving image was on another grid)."""
                return flash_displacement(self.params, Band(self.warped.shape, self.band_size), alpha=self.alpha,
                                          gamma=self.gamma, power=self.power, steps=self.steps)

            def _doc(self, kind: str) -> dict:
                return transform_document(self.params, alpha=self.alpha, gamma=self.gamma, power=self.power,
                                          steps=self.steps, shape=self.warped.shape)

            def report_json(self) -> dict:
                out = super().report_json()
                out["flash"] = {"alpha": self.alpha, "band_size": self.band_size, "sigma": self.sigma,
                                "objectives": [float(x) for x in self.objectives]}
                return out

        _FLASH_RESULT = FlashResult
    return _FLASH_RESULT


_FLASH_RESULT = None


def transform_document(v0, *, alpha, gamma, power, steps, shape) -> dict:
    """The ``transform.json`` document of a FLASH registration (coefficients as real and imaginary lists)."""
    v0 = np.asarray(v0)
    return {
        "type": "flash",
        "shape": [int(n) for n in shape],
        "band_size": int(v0.shape[0]),
        "alpha": float(alpha), "gamma": float(gamma), "power": int(power), "steps": int(steps),
        "integrator": "euler",
        "coefficients_real": v0.real.tolist(),
        "coefficients_imag": v0.imag.tolist(),
        "convention": "v0(x) = sum_k c_k exp(2 pi i k.x / N), k_j in [-(T-1)/2, (T-1)/2] (centred index), x in voxel "
                      "indices of the fixed grid (array axis order), component j along axis j; shoot EPDiff with "
                      "L = T^d (alpha A + gamma)^power over `steps` Euler steps; u = phi_1^-1 - x; "
                      "warped(x) = moving(x + u(x))",
    }


def displacement_from_document(doc: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Dense displacement ``(*shape, d)`` from a FLASH ``transform.json`` document.

    Raises:
        ValueError: a malformed document, or coefficients that do not match ``shape``.
    """
    try:
        v0 = np.asarray(doc["coefficients_real"], np.float32) + 1j * np.asarray(doc["coefficients_imag"], np.float32)
        band = Band(tuple(int(n) for n in doc["shape"]), int(doc["band_size"]))
        alpha, gamma, power, steps = float(doc["alpha"]), float(doc["gamma"]), int(doc["power"]), int(doc["steps"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a FLASH transform document: {exc!r}") from None
    if band.shape != tuple(shape):
        raise ValueError(f"FLASH transform was estimated on grid {band.shape} but the reference grid is {tuple(shape)}")
    if v0.shape != band.coeff_shape:
        raise ValueError(f"FLASH coefficients have shape {v0.shape}, expected {band.coeff_shape}")
    return flash_displacement(v0, band, alpha=alpha, gamma=gamma, power=power, steps=steps)


def register_result(fixed, moving, *, loss="ssd", secure=None, sampling=None, max_iterations=None, **options):
    """``ppreg.register(..., transform="flash")``: run :func:`register_flash` and wrap it in a Result.

    Args:
        fixed, moving: arrays or :class:`~ppreg.image.Image`; a moving image on another grid is first
            resampled onto the fixed one through the headers (:func:`ppreg.methods.on_fixed_grid`).
        loss, sampling: must be ``"ssd"`` and ``None``.
        secure: ``None`` (clear) or ``"mpc"``: party2 holds ``fixed``; the image energy and the
            band force of every evaluation run under MPC (:mod:`ppreg.secure.protocols.flash`), both
            images scaled by the public power of two ``2^max(e_fixed, e_moving)``; the final
            mean squared error is computed securely.
        max_iterations: descent iterations (default 150).
        **options: keyword arguments of :func:`register_flash` (band_size, alpha, sigma, ...).

    Returns:
        ``FlashResult`` (a :class:`ppreg.register.Result`).

    Raises:
        ValueError: other loss / secure / sampling, bad images, bad options.
    """
    from ..methods import on_fixed_grid, warp_deformed

    start = time.perf_counter()
    if loss != "ssd" or secure not in (None, "mpc") or sampling is not None:
        raise ValueError("the flash transform runs the ssd loss on every voxel, clear or secure='mpc', got "
                         f"loss={loss!r}, secure={secure!r}, sampling={sampling!r}")
    pair = on_fixed_grid(fixed, moving)
    fixed_a = pair.fixed
    options = {**DEFAULTS, **options}
    iterations = 150 if max_iterations is None else int(max_iterations)
    session = None
    if secure == "mpc":
        from ..secure.mpc.shares import TwoPartySession

        session = TwoPartySession()
        options["intensity_scale"] = pair.scale  # 2^max(e_fixed, e_moving), as setup_pair computes it
    v0, alpha, its, fs, u, _ = register_flash(fixed_a, pair.moving_d, iterations=iterations, session=session,
                                              **options)
    warped = np.asarray(warp_deformed(pair, jnp.asarray(u)))
    if session is None:
        final = float(np.mean((warped - np.asarray(fixed_a)) ** 2))
        time_s = {"party1": time.perf_counter() - start, "party2": 0.0}
        zero = {"online": 0, "offline": 0}
        nbytes, per_iteration = {"party1": dict(zero), "party2": dict(zero)}, {"party1": 0.0, "party2": 0.0}
    else:
        from ..secure.protocols.lcc import sum_squared_difference

        scale = options["intensity_scale"]
        final = sum_squared_difference(session, warped / scale, np.asarray(fixed_a) / scale) * scale**2 / warped.size
        time_s = {"party1": time.perf_counter() - start, "party2": 0.0}  # one process: wall time, both parties
        snap = session.channel.traffic.snapshot()
        nbytes = {p: {"online": snap["sent"][p]["online"], "offline": snap["received"][p]["offline"]}
                  for p in ("party1", "party2")}
        per_iteration = {p: nbytes[p]["online"] / max(its, 1) for p in nbytes}
    return flash_result(v0, alpha, its, fs, u, warped, final, options, secure=secure, time_s=time_s, nbytes=nbytes,
                        per_iteration=per_iteration, matrix=pair.header_mat, fixed_affine=pair.w_fixed,
                        moving_affine=pair.w_moving)


def flash_result(v0, alpha, its, fs, u, warped, final, options, *, secure, time_s, nbytes, per_iteration,
                 matrix=None, fixed_affine=None, moving_affine=None):
    """The ``FlashResult`` of a registration (in one process, :func:`register_result`, or party1's of
    three, :func:`ppreg.secure.protocols.flash.register_moving_flash`): ``options`` as :data:`DEFAULTS`;
    ``u`` the displacement :func:`register_flash` already shot (kept, so writing the outputs does not
    shoot again); ``matrix`` the header start (fixed index -> moving index, or ``None``) and the two
    voxel-to-world matrices."""
    from ..result import LevelReport

    shape = tuple(np.shape(warped))
    frame = dict(matrix=matrix, fixed_affine=fixed_affine, moving_affine=moving_affine)
    return _result_class()(
        transform="flash", params=v0, **frame, center=None, spacing=None, warped=warped, final_loss=final,
        iterations=its, levels=(LevelReport(1, shape, its, int(np.prod(shape)), fs),), secure=secure,
        time_s=time_s, bytes=nbytes, bytes_per_iteration=per_iteration,
        alpha=alpha, gamma=float(options["gamma"]), power=int(options["power"]), steps=int(options["steps"]),
        band_size=int(options["band_size"]), sigma=float(options["sigma"]), objectives=fs,
    ).with_deformable(np.asarray(u, np.float32))
