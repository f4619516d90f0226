"""SUITS foundation (Blendowski et al. 2020): FeatCNN, the Gauss-Newton step and its implicit gradient,
the MIND replicator and Algorithm 1 losses, checkpoints, refusal of bad input. CI-sized (2D 32x32)."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppreg.learned import checkpoint
from ppreg.learned.featcnn import FeatCNN, count_parameters, parameter_count
from ppreg.learned.suits import (
    SuitsConfig,
    cross_entropy,
    gn_step,
    laplacian,
    make_train_step,
    mind_replicator_loss,
    mind_target,
    register_features,
    suits_loss,
    warp_clamped,
)

TINY = dict(features=(4, 8, 8, 8))  # a small 2D FeatCNN for the training tests


# ----------------------------------------------------------------------------------------------
# FeatCNN


def test_featcnn_parameter_count_matches_table1():
    model = eqx.filter_eval_shape(lambda: FeatCNN(3, key=jax.random.key(0)))  # shapes only, no compute
    n = count_parameters(model)
    # Table 1 by hand: per stream conv1 1->16 (5^3) and conv2 16->32 (3^3); shared 32->32, 32->32, 32->12 (3^3)
    stems = 2 * ((1 * 16 * 125 + 16) + (16 * 32 * 27 + 32))
    shared = (32 * 32 * 27 + 32) * 2 + (32 * 12 * 27 + 12)
    table1 = stems + shared
    print(f"FeatCNN 3D parameters: {n} (Table 1: {table1}; Sec. 4.2 says about 155k)")
    assert n == parameter_count(3) == table1 == 97_484
    assert abs(n - table1) <= 0.1 * table1
    # the text's "about 155k" is met when only the last layer is shared (see featcnn's docstring)
    n1 = count_parameters(eqx.filter_eval_shape(lambda: FeatCNN(3, shared=1, key=jax.random.key(0))))
    assert n1 == parameter_count(3, shared=1) and abs(n1 - 155_000) <= 0.1 * 155_000


def test_featcnn_shapes_streams_and_range():
    model = FeatCNN(2, **TINY, key=jax.random.key(1))
    image = jax.random.uniform(jax.random.key(2), (32, 24))
    f0, f1 = eqx.filter_jit(lambda m, x: (m(x, 0), m(x, 1)))(model, image)
    assert f0.shape == f1.shape == (8, 6, 4) and f0.dtype == jnp.float32
    assert bool(jnp.all((f0 > 0) & (f0 < 1)))
    assert not np.allclose(f0, f1)  # two stems
    a, b = eqx.filter_jit(lambda m, x: m.pair(x, x))(model, image)
    np.testing.assert_array_equal(a, f0)
    np.testing.assert_array_equal(b, f1)


def test_featcnn_3d_forward_and_gn_step():
    model = FeatCNN(3, features=(4, 8, 8, 8), key=jax.random.key(23))
    vol = jax.random.uniform(jax.random.key(24), (16, 16, 16))
    u = jnp.zeros((4, 4, 4, 3))

    @eqx.filter_jit
    def run(m, v):
        f0, f1 = m(v, 0), m(jnp.roll(v, 4, axis=2), 1)
        return f0, gn_step(f0, f0, u, lam=10.0), gn_step(f0, f1, u, lam=10.0)

    feats, z0, z = run(model, vol)
    assert feats.shape == (4, 4, 4, 12)
    np.testing.assert_array_equal(z0, 0.0)
    assert z.shape == (4, 4, 4, 3) and bool(jnp.all(jnp.isfinite(z)))


def test_featcnn_checkpoint_round_trip(tmp_path):
    kwargs = dict(ndim=2, features=[4, 8, 8, 8], out_channels=4, shared=3)
    model = FeatCNN(**kwargs, key=jax.random.key(3))
    checkpoint.save(tmp_path / "featcnn", model, architecture="FeatCNN", kwargs=kwargs)
    loaded = checkpoint.load(tmp_path / "featcnn").model
    assert isinstance(loaded, FeatCNN)
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(loaded, eqx.is_array))):
        np.testing.assert_array_equal(a, b)
    image = jax.random.uniform(jax.random.key(4), (16, 16))
    np.testing.assert_array_equal(model(image, 1), loaded(image, 1))


# ----------------------------------------------------------------------------------------------
# The Gauss-Newton step


def _features(key, shape=(6, 7), channels=3, shift=1):
    k1, k2 = jax.random.split(key)
    base = jax.random.uniform(k1, (*shape, channels))
    fix = base
    mov = jnp.roll(base, shift, axis=0) + 0.05 * jax.random.normal(k2, base.shape)
    return fix, mov


def _energy(z, fix, mov, u, lam, regularize="total"):
    """Eq. 4 linearised about u, with the regulariser on u + z (or on z alone), written independently of
    gn_step."""
    g = jnp.stack(jnp.gradient(mov, axis=(0, 1)), axis=-1)
    data = jnp.einsum("...ck,...k->...c", g, z) + mov - fix
    w = u + z if regularize == "total" else z
    reg = sum(jnp.sum(jnp.diff(w, axis=a) ** 2) for a in range(2))
    return 0.5 * jnp.sum(data**2) + 0.5 * lam * reg


@pytest.mark.parametrize("regularize", ["total", "update"])
def test_gn_step_minimises_the_linearised_energy(regularize):
    fix, mov = _features(jax.random.key(5))
    u = 0.3 * jax.random.normal(jax.random.key(6), (*fix.shape[:-1], 2))
    with jax.enable_x64(True):
        fix, mov, u = (x.astype(jnp.float64) for x in (fix, mov, u))
        z = jax.jit(lambda f, m, uu: gn_step(f, m, uu, lam=0.7, tol=1e-12, maxiter=500,
                                             regularize=regularize))(fix, mov, u)
        grad = jax.jit(jax.grad(_energy), static_argnums=5)(z, fix, mov, u, 0.7, regularize)
        assert float(jnp.max(jnp.abs(grad))) < 1e-8
        # the other regulariser's energy is not stationary there (u is not smooth)
        other = "update" if regularize == "total" else "total"
        assert float(jnp.max(jnp.abs(jax.grad(_energy)(z, fix, mov, u, 0.7, other)))) > 1e-3
        # L is the graph Laplacian: v^T L v = sum over edges of squared differences
        v = jax.random.normal(jax.random.key(7), (5, 4, 1), jnp.float64)
        assert float(jnp.sum(v * laplacian(v))) == pytest.approx(
            float(sum(jnp.sum(jnp.diff(v, axis=a) ** 2) for a in range(2))), rel=1e-12)


def test_gn_step_identity_gives_zero():
    fix, _ = _features(jax.random.key(8))
    u = jnp.zeros((*fix.shape[:-1], 2))
    z = gn_step(fix, fix, u, lam=5.0)
    assert z.shape == u.shape
    np.testing.assert_array_equal(z, 0.0)
    # regularising the update only, equal features leave any displacement where it is
    u_rough = jax.random.normal(jax.random.key(9), u.shape)
    np.testing.assert_array_equal(gn_step(fix, fix, u_rough, lam=5.0, regularize="update"), 0.0)
    with pytest.raises(ValueError, match="regularize must be one of"):
        gn_step(fix, fix, u, lam=5.0, regularize="fluid")
    # and its implicit gradient there is finite
    g = jax.jit(jax.grad(lambda m: jnp.sum(gn_step(fix, m, u, lam=5.0) ** 2 + gn_step(fix, m, u, lam=5.0))))(fix)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_gn_step_recovers_a_shift_direction():
    x = jnp.arange(16.0)
    img = jnp.exp(-((x[:, None] - 8) ** 2 + (x[None, :] - 7) ** 2) / 10.0)
    fix = img[..., None]
    mov = jnp.roll(img, 1, axis=0)[..., None]  # mov(x) = fix(x - e0): u = +e0 aligns
    z = gn_step(fix, mov, jnp.zeros((16, 16, 2)), lam=0.05)
    centre = z[6:11, 5:10]
    assert float(jnp.mean(centre[..., 0])) > 0.3 and abs(float(jnp.mean(centre[..., 1]))) < 0.1


def _grad_setup(key):
    fix, mov = _features(key)
    u = 0.2 * jax.random.normal(jax.random.fold_in(key, 1), (*fix.shape[:-1], 2))
    w = jax.random.normal(jax.random.fold_in(key, 2), u.shape)
    return fix, mov, u, w


def test_gn_step_implicit_gradient_matches_finite_differences_and_unrolled_cg():
    with jax.enable_x64(True):
        fix, mov, u, w = (x.astype(jnp.float64) for x in _grad_setup(jax.random.key(9)))
        lam = 0.5

        def _objective(f, m, uu, implicit=True, matrix_gradient=True):
            z = gn_step(f, m, uu, lam=lam, maxiter=400, tol=1e-13, implicit=implicit,
                        matrix_gradient=matrix_gradient)
            return jnp.sum(w * z)

        objective = jax.jit(_objective, static_argnames=("implicit", "matrix_gradient"))

        grads = jax.grad(objective, argnums=(0, 1, 2))(fix, mov, u)
        # finite differences along random directions (central, float64)
        errors = []
        for i, (arg, g) in enumerate(zip((fix, mov, u), grads)):
            d = jax.random.normal(jax.random.key(10 + i), arg.shape, jnp.float64)
            eps = 1e-6
            args_p = [fix, mov, u]
            args_m = [fix, mov, u]
            args_p[i] = arg + eps * d
            args_m[i] = arg - eps * d
            fd = (objective(*args_p) - objective(*args_m)) / (2 * eps)
            ad = jnp.sum(g * d)
            errors.append(float(abs(fd - ad) / max(abs(float(fd)), 1e-12)))
        print("relative error implicit vs finite differences (fix, mov, u):", errors)
        assert max(errors) < 1e-6

        # unrolled differentiation of a CG run to convergence (400 iterations >> 84 unknowns)
        unrolled = jax.grad(lambda *a: objective(*a, implicit=False), argnums=(0, 1, 2))(fix, mov, u)
        rel = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(grads, unrolled)]
        print("relative max error implicit vs unrolled CG (fix, mov, u):", rel)
        assert max(rel) < 1e-7

        # matrix_gradient=False drops exactly the A-part (Eq. 9): the b-part alone differs from the full one
        no_a = jax.grad(lambda m: objective(fix, m, u, matrix_gradient=False))(mov)
        assert float(jnp.max(jnp.abs(no_a - grads[1]))) > 1e-3


def test_gn_step_implicit_gradient_float32_close_to_unrolled():
    fix, mov, u, w = _grad_setup(jax.random.key(11))

    def f(m, implicit):
        return jnp.sum(w * gn_step(fix, m, u, lam=0.5, maxiter=300, tol=1e-7, implicit=implicit))

    a = jax.grad(f)(mov, True)
    b = jax.grad(f)(mov, False)
    assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-3


# ----------------------------------------------------------------------------------------------
# Losses and training


def _pair(key, shape=(32, 32), shift=2):
    """A tiny multi-modal pair: disc + square, the moving one shifted and with other intensities."""
    i, j = jnp.meshgrid(jnp.arange(shape[0]), jnp.arange(shape[1]), indexing="ij")

    def labels(s):
        disc = (i - 12 - s) ** 2 + (j - 12) ** 2 < 36
        square = (jnp.abs(i - 21 - s) < 5) & (jnp.abs(j - 21) < 5)
        return jnp.where(disc, 1, jnp.where(square, 2, 0))

    lf, lm = labels(0), labels(shift)
    fixed = jnp.array([0.1, 0.9, 0.5])[lf]
    moving = jnp.array([0.8, 0.2, 0.4])[lm] + 0.02 * jax.random.normal(key, shape)
    oh = lambda lab: jax.nn.one_hot(lab, 3, dtype=jnp.float32)  # noqa: E731
    return {"fixed": fixed, "moving": moving, "fixed_labels": oh(lf), "moving_labels": oh(lm)}


def test_mind_replicator_loss():
    model = FeatCNN(2, **TINY, key=jax.random.key(12))
    batch = _pair(jax.random.key(13))
    target = mind_target(batch["fixed"])
    assert target.shape == (8, 8, 4)
    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(m, s):
        value, g = eqx.filter_value_and_grad(mind_replicator_loss)(m, batch["fixed"], batch["moving"])
        updates, s = opt.update(g, s, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), s, value

    values = []
    for _ in range(5):
        model, state, value = step(model, state)
        values.append(float(value))
    assert 0.0 < values[0] < 1.0 and values[-1] < values[0]


def test_suits_loss_decreases_with_optax():
    batch = jax.tree_util.tree_map(lambda x: x[None], _pair(jax.random.key(14)))
    model = FeatCNN(2, **TINY, key=jax.random.key(15))
    config = SuitsConfig(iterations=1, lam=1.0, cg_maxiter=60, cg_tol=1e-4)  # k_back = 1: the tracked step only
    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(model, eqx.is_array))
    step = make_train_step(opt, config)
    key = jax.random.key(16)
    losses = []
    for _ in range(6):
        model, state, loss = step(model, state, key, batch)
        losses.append(float(loss))
    print("SUITS loss over 6 Adam steps:", losses)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05
    assert losses[-1] > np.log(1 + 2 / np.e) - 1e-6  # the floor of the softmax cross entropy with 3 labels


def test_suits_loss_terms_and_k_back_range():
    batch = _pair(jax.random.key(17))
    model = FeatCNN(2, **TINY, key=jax.random.key(18))
    config = SuitsConfig(iterations=3, lam=1.0, cg_maxiter=40)
    ks = []
    loss_fn = eqx.filter_jit(lambda m, k: suits_loss(m, k, batch, config=config))
    for s in range(6):
        loss, terms = loss_fn(model, jax.random.key(s))
        assert np.isfinite(float(loss))
        ks.append(int(terms["k_back"]))
    assert set(ks) <= {1, 2, 3} and len(set(ks)) > 1


def test_feature_warmup_starts_the_tracked_step_where_test_time_registration_is():
    """warmup="features": the k_back - 1 untracked steps are register_features' own steps, so the loss is the
    cross entropy after k_back test-time steps; the gradient still reaches the network (through the last one)."""
    batch = _pair(jax.random.key(23))
    model = FeatCNN(2, **TINY, key=jax.random.key(24))
    config = SuitsConfig(iterations=3, lam=1.0, cg_maxiter=40, cg_tol=1e-4, warmup="features")
    key = next(jax.random.key(s) for s in range(20)
               if int(jax.random.randint(jax.random.key(s), (), 1, 4)) == 3)  # k_back = 3: two untracked steps
    (loss, terms), grads = eqx.filter_jit(eqx.filter_value_and_grad(
        lambda m: suits_loss(m, key, batch, config=config), has_aux=True))(model)
    assert int(terms["k_back"]) == 3
    u = register_features(model, batch["fixed"], batch["moving"], iterations=3, lam=1.0, cg_maxiter=40, cg_tol=1e-4)
    expected = cross_entropy(warp_clamped(batch["moving_labels"], u), batch["fixed_labels"])
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    labels_loss, _ = suits_loss(model, key, batch, config=SuitsConfig(iterations=3, lam=1.0, cg_maxiter=40,
                                                                     cg_tol=1e-4))
    assert abs(float(labels_loss) - float(loss)) > 1e-4  # the label warm-up reaches another state
    norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)))
    assert np.isfinite(norm) and norm > 0
    with pytest.raises(ValueError, match="warmup"):
        SuitsConfig(warmup="oracle")
    # the same identity with the diffusion term on each update (the test-time default)
    update = dataclasses.replace(config, regularize="update")
    loss_u, _ = eqx.filter_jit(lambda m: suits_loss(m, key, batch, config=update))(model)
    u = register_features(model, batch["fixed"], batch["moving"], iterations=3, lam=1.0, cg_maxiter=40, cg_tol=1e-4,
                          regularize="update")
    expected = cross_entropy(warp_clamped(batch["moving_labels"], u), batch["fixed_labels"])
    np.testing.assert_allclose(float(loss_u), float(expected), rtol=1e-5)
    with pytest.raises(ValueError, match="regularize"):
        SuitsConfig(regularize="fluid")


def test_register_features_shapes():
    batch = _pair(jax.random.key(19))
    model = FeatCNN(2, **TINY, key=jax.random.key(20))
    run = eqx.filter_jit(lambda m, f, mv: register_features(m, f, mv, iterations=2, lam=10.0, cg_maxiter=40))
    u = run(model, batch["fixed"], batch["moving"])
    assert u.shape == (32, 32, 2) and bool(jnp.all(jnp.isfinite(u)))
    assert warp_clamped(batch["moving"], u).shape == (32, 32)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused():
    fix = jnp.zeros((8, 8, 3))
    u = jnp.zeros((8, 8, 2))
    with pytest.raises(ValueError, match="one shape"):
        gn_step(fix, jnp.zeros((8, 9, 3)), u, lam=1.0)
    with pytest.raises(ValueError, match="one shape"):
        gn_step(fix, jnp.zeros((8, 8, 4)), u, lam=1.0)  # channel counts differ
    with pytest.raises(ValueError, match="displacement"):
        gn_step(fix, fix, jnp.zeros((8, 8, 3)), lam=1.0)
    with pytest.raises(ValueError, match="lam"):
        gn_step(fix, fix, u, lam=0.0)
    with pytest.raises(ValueError, match=r"\(\*spatial, C\)"):
        gn_step(jnp.zeros((8, 3)), jnp.zeros((8, 3)), jnp.zeros((8, 1)), lam=1.0)

    model = FeatCNN(2, **TINY, key=jax.random.key(21))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(jnp.zeros((30, 32)), 0)
    with pytest.raises(ValueError, match="channel"):
        model(jnp.zeros((32, 32, 2)), 0)  # two channels into a one-channel network
    with pytest.raises(ValueError, match="stream"):
        model(jnp.zeros((32, 32)), 2)
    with pytest.raises(ValueError, match="one shape"):
        model.pair(jnp.zeros((32, 32)), jnp.zeros((32, 28)))
    with pytest.raises(ValueError, match="out_channels"):
        mind_replicator_loss(FeatCNN(2, **TINY, out_channels=12, key=jax.random.key(0)),
                             jnp.zeros((32, 32)), jnp.zeros((32, 32)))
    with pytest.raises(ValueError, match="2D"):
        mind_replicator_loss(model, jnp.zeros((16, 16, 16)), jnp.zeros((16, 16, 16)))
    batch = _pair(jax.random.key(22))
    with pytest.raises(ValueError, match="one-hot"):
        suits_loss(model, jax.random.key(0), {**batch, "moving_labels": batch["moving_labels"][..., :2]})
    with pytest.raises(ValueError, match="lacks"):
        suits_loss(model, jax.random.key(0), {"fixed": batch["fixed"]})
    with pytest.raises(ValueError, match="FeatCNN supports"):
        FeatCNN(4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="shared"):
        FeatCNN(2, shared=6, key=jax.random.key(0))
    with pytest.raises(ValueError):
        SuitsConfig(lam=0.0)
