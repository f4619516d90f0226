"""Issue 13, finding 1: the B-spline protocol reveals ``R = B^T (a ⊙ J)`` to party1 every
iteration (``d P`` linear functionals of party2's image ``J``, ``P`` control points), enough to
rebuild ``J`` by least squares after a few iterations. Party2 counts them itself and refuses past
its policy's ``max_spline_functionals_per_voxel``; with the default policy the reconstruction
attack below fails, with the budget switched off it succeeds (so the test can fail).

The attack: party1 runs the real MPC protocol honestly (its own moving image, one level, every
iteration: ``tol = 0``), keeps every ``(a, R)`` it receives and solves for ``J`` by regularised
least squares, ``min sum ||R - B^T (a ⊙ J)||^2 + lam ||grad J||^2``, with the best ``lam`` for the
true ``J`` (an oracle: stronger than any real attacker). Error: relative L2 error of the contrast,
``||(Jh - mean Jh) - (J - mean J)|| / ||J - mean J||`` (a constant guess scores 1; the plain relative
error of a constant guess is already 0.20 on this bright crop, so the plain error would count
learning the mean brightness as a reconstruction). Data: a 48 x 48 crop of the ITK PD slice
(shrunk 3x) and its B-spline-deformed version, the known-answer pair of tests/test_secure_bspline.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg, sparse

from ppreg.bspline import basis_matrices
from ppreg.data import load_sample
from ppreg.grid import downsample
from ppreg.options import scale_exponent
from ppreg.secure.policy import DEFAULT, Policy, PolicyError
from ppreg.secure.protocols import bspline as bp
from ppreg.secure.session import SecureSession

F = 16
SEEDS = (b"e" * 32, b"f" * 32)
CROP = (slice(20, 68), slice(12, 60))
PERMISSIVE = Policy(max_spline_functionals_per_voxel=None)


@pytest.fixture(scope="module")
def pair():
    """float32 (48, 48) fixed J and moving I, scaled into [0, 1] by the common power of two."""
    fixed, moving = (np.asarray(downsample(jnp.asarray(load_sample(name).data, jnp.float32), 3))[CROP]
                     for name in ("BrainProtonDensitySliceBorder20", "BrainProtonDensitySliceBSplined10"))
    scale = 2.0 ** max(scale_exponent(fixed), scale_exponent(moving))
    return fixed / scale, moving / scale


def run_attack(fixed, moving, policy, *, spacing, iterations):
    """Party1 runs the protocol honestly at one level; returns ``(received [(a, R)], refusal or None)``."""
    session = SecureSession(F, seeds=SEEDS, policy=policy)
    received = []

    def observe(level, sp, sigma, idx, a, r):
        assert sigma == 0 and idx is None  # full resolution, every voxel: R = B^T (a ⊙ J)
        received.append((np.asarray(a, np.float64), np.asarray(r, np.float64)))

    try:
        bp.fit_bspline(fixed, moving, session, key=jax.random.key(0), levels=(1,), spacing=spacing,
                       max_iterations=iterations, tol=0.0, observe=observe)
    except PolicyError as exc:
        return received, exc
    return received, None


def reconstruct(shape, spacing, received, truth):
    """Party1's least-squares estimate of J from what it received; returns its contrast error."""
    n = int(np.prod(shape))
    if not received:
        return contrast_error(np.zeros(n), truth)
    basis = sparse.csr_matrix(np.kron(*[np.asarray(b, np.float64) for b in basis_matrices(shape, spacing)]))  # (n, P)
    gram, rhs = sparse.csr_matrix((n, n)), np.zeros(n)
    for a, r in received:
        for c in range(a.shape[1]):
            rows = (sparse.diags(a[:, c]) @ basis).T  # (P, n): the functionals, R[..., c] = rows @ J
            gram = gram + rows.T @ rows
            rhs += rows.T @ r[..., c].reshape(-1)
    diff = [sparse.diags([-np.ones(m - 1), np.ones(m - 1)], [0, 1], shape=(m - 1, m)) for m in shape]
    grad = sparse.vstack([sparse.kron(diff[0], sparse.eye(shape[1])), sparse.kron(sparse.eye(shape[0]), diff[1])])
    gram, prior = gram.toarray(), (grad.T @ grad).toarray() + 1e-3 * np.eye(n)
    scale = np.trace(gram) / n
    return min(contrast_error(linalg.solve(gram + lam * scale * prior, rhs, assume_a="pos"), truth)
               for lam in (1e-6, 1e-4, 1e-2))


def contrast_error(estimate, truth):
    t = np.asarray(truth, np.float64).reshape(-1)
    e = np.clip(estimate, -1, 1)
    return float(np.linalg.norm((e - e.mean()) - (t - t.mean())) / np.linalg.norm(t - t.mean()))


@pytest.mark.parametrize("spacing", [4, 8])
def test_default_policy_refuses_before_party1_can_rebuild_the_image(pair, spacing):
    """Party2's default budget is zero: it refuses the level, before it masks its image, so the
    attack has nothing to solve with."""
    fixed, moving = pair
    received, refused = run_attack(fixed, moving, DEFAULT, spacing=spacing, iterations=20)
    assert refused is not None and refused.rule == "max_spline_functionals_per_voxel"
    assert "party1 can rebuild the image" in str(refused)
    assert received == []
    assert reconstruct(fixed.shape, spacing, received, fixed) > 0.5


def test_budget_counts_d_p_functionals_per_query(pair):
    """A budget of 0.1 per voxel: one query at spacing 8 (2 x 9 x 9 = 162 of 2304 voxels, 0.07) fits,
    the second is refused; party2's count is exactly what party1 received."""
    fixed, moving = pair
    policy = Policy(max_spline_functionals_per_voxel=0.1)
    received, refused = run_attack(fixed, moving, policy, spacing=8, iterations=20)
    assert refused is not None and refused.rule == "max_spline_functionals_per_voxel"
    assert "to 324 (0.141 per voxel of 2304)" in str(refused)
    assert [r.size for _, r in received] == [162]


def test_without_the_budget_party1_rebuilds_the_image(pair):
    """The same attack, party2's budget switched off: six iterations (1.2 functionals per voxel)."""
    fixed, moving = pair
    received, refused = run_attack(fixed, moving, PERMISSIVE, spacing=4, iterations=6)
    assert refused is None and len(received) == 6
    assert reconstruct(fixed.shape, 4, received, fixed) < 0.1


def test_party2_adds_the_noise_its_policy_sets(pair):
    """With ``spline_noise`` party2 adds Gaussian noise of std ``noise 2^61`` ring units to its share:
    R differs from the noise-free R by that much at party1's scale (``2^(f_a + f) sigma``)."""
    fixed, moving = pair
    noise = 1e-3
    clean, _ = run_attack(fixed, moving, PERMISSIVE, spacing=8, iterations=1)
    noisy, _ = run_attack(fixed, moving, Policy(max_spline_functionals_per_voxel=None, spline_noise=noise),
                          spacing=8, iterations=1)
    (a, r0), (a1, r1) = clean[0], noisy[0]
    np.testing.assert_array_equal(a, a1)
    pmap = bp.spline_map(fixed.shape, 8)
    a_bits = int(bp.a_bits_for(bp.abs_bound(pmap, a), F, pmap.sigma))
    unit = bp.noise_std_ring(noise) / 2.0 ** pmap.scale_bits(a_bits, F)
    ratio = float(np.std(r1 - r0) / unit)
    assert 0.8 < ratio < 1.2  # 162 samples: the std estimate is within 10 % (one sigma)
    assert float(np.max(np.abs(bp.standard_normal((4096,))))) <= 8.6


def test_spline_policy_keys_parse_and_name_themselves():
    p = Policy.from_mapping({"max_spline_functionals_per_voxel": 2.5, "spline_noise": 1e-5})
    assert (p.max_spline_functionals_per_voxel, p.spline_noise) == (2.5, 1e-5)
    assert Policy.from_mapping({"max_spline_functionals_per_voxel": None}).max_spline_functionals_per_voxel is None
    for bad in ({"spline_noise": 0.5}, {"spline_noise": -1e-3}, {"max_spline_functionals_per_voxel": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Policy.from_mapping(bad)


def test_ckks_party2_counts_and_refuses_by_its_own_code(pair):
    """The CKKS twin: party2's SplineParty2 counts the d P functionals of each reply and refuses
    past the same policy key before decrypting anything."""
    pytest.importorskip("tenseal")
    from ppreg.secure.ckks.bspline import fit_bspline_ckks
    from ppreg.secure.ckks.session import CkksSession

    fixed, moving = pair
    session = CkksSession("packed")
    with pytest.raises(PolicyError, match="max_spline_functionals_per_voxel"):
        fit_bspline_ckks(fixed, moving, session, key=jax.random.key(0), levels=(1,), spacing=4, max_iterations=3,
                         tol=0.0, policy=DEFAULT)
    assert session.spline.party2.queries == session.spline.party2.functionals == 0
    # opted in (and with noise): party2 counts 2 x 9 x 9 = 162 functionals per query at spacing 8
    session = CkksSession("packed")
    policy = Policy(max_spline_functionals_per_voxel=0.1, spline_noise=1e-4)
    _, its = fit_bspline_ckks(fixed, moving, session, key=jax.random.key(0), levels=(1,), spacing=8, max_iterations=1,
                              tol=0.0, policy=policy)
    assert its[0][1] == session.spline.party2.queries == 1 and session.spline.party2.functionals == 162
