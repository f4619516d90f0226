"""Alpha-predicting CNN (004 Sec. 3.2; ppreg.learned.alpha_cnn, alpha_data): shapes, overfit,
checkpoint round trip, refusal of bad input, the data split and the alpha_MAP labels (CI-sized)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.learned import load, save
from ppreg.learned.alpha_cnn import (
    AlphaCNN,
    fit_alpha_cnn,
    init_optimizer,
    make_optimizer,
    predict_alpha,
    train_step,
    trainable_filter,
)
from ppreg.learned.alpha_data import (
    build_alpha_dataset,
    label_alpha_map,
    random_bullseye,
    split_indices,
    synthesize_alpha_pairs,
)

TINY = dict(stream_features=(4, 8, 8, 8), fusion_features=(8, 8, 8), kernel_size=3)
OPT = make_optimizer(1e-2, 1e-4)  # one object: train_step's compilation is shared by the tests


@eqx.filter_jit
def _infer(model, source, target):
    return model(source, target)


@eqx.filter_jit
def _train_forward(model, source, target):
    return model.forward(source, target, train=True)


def _tiny(ndim, seed=0, **kw):
    return AlphaCNN(ndim, **{**TINY, **kw}, key=jax.random.key(seed))


def test_forward_shapes_2d_and_3d():
    m2 = _tiny(2)
    s = jax.random.uniform(jax.random.key(1), (3, 20, 17))
    t = jax.random.uniform(jax.random.key(2), (3, 20, 17))
    out = _infer(m2, s, t)
    assert out.shape == (3,) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert _infer(m2, s[0], t[0]).shape == ()
    pred, stats = _train_forward(m2, s, t)
    assert pred.shape == (3,) and len(stats) == 4 + 4 + 3 and stats[0][0].shape == (4,)
    np.testing.assert_allclose(np.asarray(jnp.exp(out)), np.asarray(predict_alpha(m2, s, t)), rtol=1e-5)
    m3 = _tiny(3)
    s3 = jax.random.uniform(jax.random.key(3), (2, 16, 16, 18))
    out3 = _infer(m3, s3, s3[::-1])
    assert out3.shape == (2,) and bool(jnp.all(jnp.isfinite(out3)))


def test_default_architecture_on_the_paper_size():
    """Default widths (kernel 5) on a 100 x 100 pair: 100 -> 6 after four pools, finite output."""
    m = AlphaCNN(2, key=jax.random.key(0))
    img = random_bullseye(jax.random.key(1))
    out = _infer(m, img, img)
    assert out.shape == () and bool(jnp.isfinite(out))
    assert m.streams[0][0].conv.weight.shape == (16, 1, 5, 5) and m.fusion[0].conv.weight.shape[1] == 128


def test_bad_input_is_refused():
    m = _tiny(2)
    a = jnp.zeros((2, 16, 16))
    with pytest.raises(ValueError, match="one shape"):
        m(a, jnp.zeros((2, 16, 20)))
    with pytest.raises(ValueError, match="spatial axes"):
        m(jnp.zeros((2, 1, 16, 16)), jnp.zeros((2, 1, 16, 16)))
    with pytest.raises(ValueError, match="spatial axes"):
        m(jnp.zeros((16,)), jnp.zeros((16,)))
    with pytest.raises(ValueError, match=">= 16"):
        m(jnp.zeros((2, 8, 16)), jnp.zeros((2, 8, 16)))
    with pytest.raises(ValueError, match=">= 16"):
        _tiny(3)(a, a)  # a 2D batch read as one 3D image: its first side is too small
    with pytest.raises(ValueError, match="spatial axes"):
        _tiny(3)(a[0], a[0])  # a 2D image
    with pytest.raises(ValueError, match="2D and 3D"):
        AlphaCNN(4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="odd"):
        AlphaCNN(2, kernel_size=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="positive"):
        fit_alpha_cnn(m, np.zeros((2, 16, 16)), np.zeros((2, 16, 16)), np.array([1.0, -1.0]), epochs=1, batch_size=2)


def test_regressor_overfits_a_handful_of_pairs():
    data = synthesize_alpha_pairs(0, 4, shape=(16, 16), band_size=5, alphas=(1.0, 3.0, 6.0, 11.0))
    model = _tiny(2, log_alpha_init=float(np.log(data["alpha_true"]).mean()))
    state = init_optimizer(OPT, model)
    losses = []
    for _ in range(40):
        model, state, loss = train_step(model, state, OPT, data["source"], data["target"], data["alpha_true"])
        losses.append(float(loss))
    assert losses[-1] < losses[0] / 20, losses
    # the running statistics moved (kept out of the optimiser, written back by the step)
    assert not np.allclose(np.asarray(model.streams[0][0].norm.mean), 0.0)
    # weight decay and the optimiser skip the running statistics
    spec = trainable_filter(model)
    assert spec.streams[0][0].norm.mean is False and spec.streams[0][0].conv.weight is True


def test_checkpoint_round_trip(tmp_path):
    kwargs = {"ndim": 2, **TINY, "log_alpha_init": 1.5}
    model = AlphaCNN(**kwargs, key=jax.random.key(4))
    s = jax.random.uniform(jax.random.key(5), (4, 16, 16))
    t = jax.random.uniform(jax.random.key(6), (4, 16, 16))
    model, _, _ = train_step(model, init_optimizer(OPT, model), OPT, s, t, jnp.array([1.0, 2.0, 4.0, 8.0]))
    save(tmp_path / "ckpt", model, architecture="AlphaCNN", kwargs=kwargs)
    loaded = load(tmp_path / "ckpt")
    assert loaded.config["architecture"] == "AlphaCNN"
    np.testing.assert_array_equal(np.asarray(_infer(loaded.model, s, t)), np.asarray(_infer(model, s, t)))
    np.testing.assert_array_equal(np.asarray(loaded.model.fusion[2].norm.var), np.asarray(model.fusion[2].norm.var))


def test_split_is_deterministic_and_disjoint():
    a, b = split_indices(900, 7), split_indices(900, 7)
    assert [len(a[k]) for k in ("train", "val", "test")] == [630, 135, 135]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    all_ = np.concatenate([a["train"], a["val"], a["test"]])
    assert np.array_equal(np.sort(all_), np.arange(900))
    assert not np.array_equal(split_indices(900, 8)["test"], a["test"])
    small = split_indices(7, 0)
    assert sum(len(v) for v in small.values()) == 7 and len(set(np.concatenate(list(small.values())))) == 7
    with pytest.raises(ValueError):
        split_indices(10, 0, (0.5, 0.5, 0.5))


def test_synthesized_pairs_are_deterministic_per_index():
    d5 = synthesize_alpha_pairs(3, 5, shape=(24, 24), band_size=5, chunk=3)
    d3 = synthesize_alpha_pairs(3, 3, shape=(24, 24), band_size=5)
    np.testing.assert_allclose(d5["target"][:3], d3["target"], atol=1e-5)  # (vmap width changes rounding)
    assert d5["source"].shape == (5, 24, 24) and d5["alpha_true"].tolist() == [3.0, 6.0, 11.0, 3.0, 6.0]
    assert not np.array_equal(d5["source"][0], d5["source"][1])  # random ellipses per pair
    assert float(np.abs(d5["target"] - d5["source"]).max()) > 0.1  # deformed (plus noise)
    with pytest.raises(ValueError, match="3D source"):
        synthesize_alpha_pairs(0, 2, shape=(16, 16, 16), band_size=5)
    with pytest.raises(ValueError, match="positive"):
        synthesize_alpha_pairs(0, 2, shape=(16, 16), band_size=5, alphas=(0.0,))


def test_alpha_map_labels_per_pair_and_vmapped_agree():
    """The Laplace alpha_MAP per pair (tiny: 16 x 16, band 5, few iterations): positive, and the
    vmapped labelling gives the per-pair loop's estimates."""
    data = build_alpha_dataset(1, 2, shape=(16, 16), band_size=5, iterations=5, rounds=1)
    assert data["alpha_map"].shape == (2,) and np.all(data["alpha_map"] > 0)
    assert data["seconds_per_pair"] > 0
    many, _ = label_alpha_map(data["source"], data["target"], band_size=5, iterations=5, rounds=1, chunk=2)
    np.testing.assert_allclose(many, data["alpha_map"], rtol=1e-3)
    with pytest.raises(ValueError, match="one"):
        label_alpha_map(data["source"], data["target"][:, :8], band_size=5)


def _network_folder(tmp_path, shape=(32, 32), band_size=7, noise=0.03):
    """A tiny AlphaCNN saved with the data description network_alpha checks."""
    kwargs = {"ndim": 2, **TINY, "log_alpha_init": float(np.log(4.0))}
    model = AlphaCNN(**kwargs, key=jax.random.key(7))
    path = tmp_path / "alpha_net"
    save(path, model, architecture="AlphaCNN", kwargs=kwargs,
         training={"data": {"shape": list(shape), "band_size": band_size, "noise": noise}})
    return path, model


def test_cli_flash_with_the_network_alpha(tmp_path):
    """``--estimate-alpha network --model DIR``: FLASH runs at the alpha the network predicts from the
    scaled pair (both images over their common max), and registers."""
    from cli_helpers import register_and_apply

    path, model = _network_folder(tmp_path)
    data = synthesize_alpha_pairs(1, 1, shape=(32, 32), band_size=7)
    moving, fixed = data["source"][0] * 100.0, data["target"][0] * 100.0
    peak = max(np.abs(moving).max(), np.abs(fixed).max())
    expected = float(predict_alpha(model, moving / peak, fixed / peak))
    doc = register_and_apply(tmp_path, fixed, moving, "--transform", "flash", "--band-size", "7",
                             "--max-iterations", "30", "--estimate-alpha", "network", "--model", str(path))
    assert doc["alpha"] == pytest.approx(expected, rel=1e-4)
    import json
    report = json.loads((doc["_outdir"] / "report.json").read_text())
    assert report["final_loss"] < 0.5 * float(np.mean((fixed - moving) ** 2))


def test_network_alpha_refuses_what_it_was_not_trained_for(tmp_path):
    from ppreg import register
    from ppreg.learned.alpha_cnn import network_alpha

    path, _ = _network_folder(tmp_path)
    img = np.asarray(random_bullseye(jax.random.key(0), (32, 32)))
    with pytest.raises(ValueError, match="trained for shape"):
        network_alpha(path, np.zeros((48, 48)), np.zeros((48, 48)), band_size=7, sigma=0.03)
    with pytest.raises(ValueError, match="trained for band_size"):
        network_alpha(path, img, img, band_size=9, sigma=0.03)
    with pytest.raises(ValueError, match="trained for sigma"):
        network_alpha(path, img, img, band_size=7, sigma=0.05)
    with pytest.raises(ValueError, match="no shipped alpha network for 3D"):
        register(np.ones((16, 16, 16)), np.ones((16, 16, 16)), transform="flash",
                 flash_options={"band_size": 5, "estimate_alpha": "network"})
    with pytest.raises(ValueError, match="2D images, got 3D"):
        register(np.ones((16, 16, 16)), np.ones((16, 16, 16)), transform="flash", model=path,
                 flash_options={"band_size": 5, "estimate_alpha": "network"})
    with pytest.raises(ValueError, match="alpha_model"):
        register(img, img, transform="flash", model=path, flash_options={"band_size": 7})


def test_shipped_alpha_model():
    """The shipped 2D network loads by default, predicts a positive alpha within the trained range's
    reach for a 100 x 100 pair, and refuses another grid."""
    from ppreg.learned.alpha_cnn import network_alpha, resolve_alpha_model

    ckpt = resolve_alpha_model(None, 2)
    assert ckpt.config["training"]["data"]["shape"] == [100, 100]
    data = synthesize_alpha_pairs(5, 1)
    alpha = network_alpha(None, data["source"][0], data["target"][0], band_size=15, sigma=0.03)
    assert 0.5 < alpha < 60.0
    with pytest.raises(ValueError, match="trained for shape"):
        network_alpha(None, data["source"][0][:64, :64], data["target"][0][:64, :64], band_size=15, sigma=0.03)


def test_shipped_alpha_model_matches_held_out_labels():
    """On the first six test-split pairs (never trained on) the shipped network's alpha is within 25 % of
    the stored Laplace alpha_MAP at the median (bench_alpha.py: 17 % over all 135) and closer than one
    constant alpha (the labels' geometric mean)."""
    import json
    from pathlib import Path

    from ppreg.learned.alpha_cnn import network_alpha

    shards = sorted((Path(__file__).resolve().parents[1] / "bench" / "alpha_labels").glob("labels_w*.json"))
    docs = [json.loads(p.read_text()) for p in shards]
    labels = {int(i): v["alpha_map"] for d in docs for i, v in d["labels"].items()}
    cfg = docs[0]["config"]
    test = [int(i) for i in split_indices(900, cfg["seed"])["test"][:6]]
    data = synthesize_alpha_pairs(cfg["seed"], max(test) + 1, alphas=cfg["alphas"], noise=cfg["noise"],
                                  band_size=cfg["band_size"])
    label = np.asarray([labels[i] for i in test])
    pred = np.asarray([network_alpha(None, data["source"][i], data["target"][i], band_size=cfg["band_size"],
                                     sigma=cfg["noise"]) for i in test])
    const = np.exp(np.mean(np.log(list(labels.values()))))
    rel = np.abs(pred - label) / label
    assert np.median(rel) < 0.25, (pred, label)
    assert np.median(rel) < np.median(np.abs(const - label) / label)
