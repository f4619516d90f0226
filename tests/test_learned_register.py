"""vxm-diff registration: register(transform="vxm-diff"), the CLI (register, apply, train), the shipped models."""

import json
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

import ppreg
from ppreg.cli import main
from ppreg.learned import checkpoint
from ppreg.learned.data import slice_bank
from ppreg.learned.recipes import MODEL_KWARGS, train_vxm_diff
from ppreg.learned.register import register_vxm, shipped_model_path
from ppreg.learned.vxm import _JITTED
from ppreg.learned.synth import make_test_pair
from ppreg.metrics import field_rmse, folding
from ppreg.learned.vxm import LossConfig
from cli_helpers import register_and_apply

TINY = {"ndim": 2, "encoder_features": [4, 8, 8], "decoder_features": [8, 8]}


def _blobs(n=3, shape=(32, 32)):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return [np.exp(-((y - 14 - i) ** 2 + (x - 15 - i) ** 2) / 40.0).astype(np.float32) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny 2D model trained for a few steps on blobs (a real checkpoint folder)."""
    out = tmp_path_factory.mktemp("model") / "vxm"
    images = np.stack(_blobs())[:, None]
    bank = {"images": images, "labels": (images > 0.5).astype(np.int32)}
    train_vxm_diff(bank, ndim=2, steps=4, batch_size=2, out=out, model_kwargs=TINY, checkpoint_every=4,
                   loss_config=LossConfig(lam=1.0), progress=False)
    return out


def test_a_resumed_run_with_new_pair_options_records_them(tiny_model, tmp_path):
    out = tmp_path / "vxm"
    shutil.copytree(tiny_model, out)
    images = np.stack(_blobs())[:, None]
    bank = {"images": images, "labels": (images > 0.5).astype(np.int32)}
    train_vxm_diff(bank, ndim=2, steps=6, batch_size=2, out=out, model_kwargs=TINY, checkpoint_every=2,
                   loss_config=LossConfig(lam=1.0), pair_options={"deform_factor": 2}, progress=False)
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["steps_done"] == 6 and training["pairs"] == {"deform_factor": 2}
    assert training["pairs_history"] == [{"from_step": 0, "pairs": {}}, {"from_step": 4, "pairs": {"deform_factor": 2}}]


def test_register_api_outputs_and_no_recompilation(tiny_model):
    fixed, moving = _blobs(2)
    result = ppreg.register(fixed, moving, transform="vxm-diff", model=tiny_model, samples=4)
    assert result.transform == "vxm-diff" and result.displacement().shape == (32, 32, 2)
    assert result.uncertainty.shape == (32, 32) and np.all(result.uncertainty >= 0)
    assert result.transform_json()["type"] == "dense" and result.transform_json()["model"]["architecture"] == "VxmDiff"
    sizes = [step._cached._cache_size() for step in _JITTED]  # first pass, later passes, samples
    assert min(sizes) >= 1
    ppreg.register(moving, fixed, transform="vxm-diff", model=tiny_model, samples=4)
    assert [step._cached._cache_size() for step in _JITTED] == sizes
    # odd sizes are padded to the network's divisor and cropped back
    odd = ppreg.register(fixed[:30, :27], moving[:30, :27], transform="vxm-diff", model=tiny_model, samples=0)
    assert odd.displacement().shape == (30, 27, 2) and odd.uncertainty is None


def test_moving_on_another_grid_is_resampled_through_the_headers(tiny_model):
    """A moving image stored with flipped and swapped axes (same world position) gives the same warped image
    and the same world map as the plain one; the network sees it on the fixed grid (index space alone would
    hand it a transposed image)."""
    from ppreg.image import Image

    fixed, moving = _blobs(2, shape=(32, 28))
    plain = ppreg.register(Image(fixed, np.eye(4)), Image(moving, np.eye(4)), transform="vxm-diff",
                           model=tiny_model, samples=0)
    stored = moving[::-1].T  # stored[a, b] = moving[31 - b, a]: the affine puts stored index (a, b) at (31 - b, a)
    affine = np.eye(4)
    affine[:2, :2] = [[0, -1], [1, 0]]
    affine[0, 3] = 31
    other = ppreg.register(Image(fixed, np.eye(4)), Image(stored, affine), transform="vxm-diff", model=tiny_model,
                           samples=0)
    np.testing.assert_allclose(other.params, plain.params, atol=1e-4)
    np.testing.assert_allclose(other.warped, plain.warped, atol=1e-4)
    np.testing.assert_allclose(other.world_transform(), plain.world_transform(), atol=1e-6)
    assert other.matrix is not None and other.transform_json()["matrix"] == np.asarray(other.matrix).tolist()
    index = np.asarray(other.displacement()) + np.stack(np.mgrid[:32, :28], -1)  # stored-grid indices
    np.testing.assert_allclose(index[..., ::-1] * [-1, 1] + [31, 0],
                               np.asarray(plain.displacement()) + np.stack(np.mgrid[:32, :28], -1), atol=1e-3)


def test_register_refuses_bad_input(tiny_model, tmp_path):
    fixed, moving = _blobs(2)
    with pytest.raises(ValueError, match="fixed is 2D but moving is 3D"):
        register_vxm(fixed, np.ones((16, 16, 16)), model=tiny_model)
    with pytest.raises(ValueError, match="2D"):
        register_vxm(np.zeros((16, 16, 16)) + 1, np.ones((16, 16, 16)), model=tiny_model)
    with pytest.raises(ValueError, match="loss"):
        ppreg.register(fixed, moving, transform="vxm-diff", loss="mi", model=tiny_model)
    with pytest.raises(checkpoint.CheckpointError):
        register_vxm(fixed, moving, model=tmp_path / "nothing-here")
    for passes in (0, 1.5, True):
        with pytest.raises(ValueError, match="passes must be an int"):
            register_vxm(fixed, moving, model=tiny_model, passes=passes)
    with pytest.raises(ValueError, match="one pass count"):
        ppreg.register(fixed, moving, transform="vxm-diff", model=tiny_model, max_iterations=(2, 2))


def test_cli_register_apply_and_uncertainty(tiny_model, tmp_path):
    fixed, moving = _blobs(2)
    doc = register_and_apply(tmp_path, fixed, moving, "--transform", "vxm-diff", "--model", str(tiny_model),
                             "--samples", "3")
    out = doc["_outdir"]
    assert doc["type"] == "dense" and doc["method"] == "vxm-diff"
    assert nib.load(out / "uncertainty.nii.gz").shape == (32, 32)
    assert nib.load(out / "dense_displacement.nii.gz").shape[:2] == (32, 32)


def test_cli_reports_a_corrupt_model(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / checkpoint.WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (bad / checkpoint.WEIGHTS_FILE).write_bytes(bytes(data))
    for name, arr in (("f", _blobs(1)[0]), ("m", _blobs(2)[1])):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"{name}.nii.gz")
    status = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "o"),
                   "--transform", "vxm-diff", "--model", str(bad)])
    assert status == 2 and "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_train_writes_a_model_and_resumes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_blobs(3)):
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"s{i}.nii.gz")
    out = tmp_path / "model"
    common = ["train", "vxm-diff", "--images", str(folder), "-o", str(out), "--batch-size", "2",
              "--checkpoint-every", "2", "--quiet"]
    assert main(common + ["--steps", "2"]) == 0
    assert main(common + ["--steps", "4"]) == 0
    saved = checkpoint.load(out)
    assert saved.config["training"]["steps_done"] == 4
    assert len(json.loads((out / checkpoint.LOG_FILE).read_text())["loss"]) == 4
    assert main(["train", "vxm-diff", "--images", str(tmp_path / "none"), "-o", str(out)]) == 2


@pytest.mark.parametrize("ndim", [2, 3])
def test_shipped_models_load(ndim):
    ckpt = checkpoint.load(shipped_model_path(ndim))
    assert ckpt.model.ndim == ndim
    assert ckpt.config["kwargs"] == MODEL_KWARGS[ndim]
    assert ckpt.config["training"]["steps_done"] >= 200
    size = sum(f.stat().st_size for f in shipped_model_path(ndim).iterdir())
    assert size < 4_000_000


def test_shipped_2d_model_beats_identity_on_a_held_out_slice():
    """A test-split slice (never trained on) deformed by a held-out-family field: the shipped model
    recovers the field better than the identity, without folding, and the default symmetric passes
    better than VoxelMorph's single forward pass."""
    bank = slice_bank("test")
    image = np.asarray(bank["images"][0, 2])
    pair = make_test_pair(jax.random.key(7), image, family="bspline")
    result = register_vxm(np.asarray(pair["fixed"]), np.asarray(pair["moving"]), samples=0)
    mask = image > 0.05
    truth = np.asarray(pair["displacement"])
    before = field_rmse(np.zeros_like(truth), truth, mask=mask)["voxels"]
    after = field_rmse(result.displacement(), truth, mask=mask)["voxels"]
    assert after < 0.7 * before
    assert folding(result.displacement())["voxels"] == 0
    single = register_vxm(np.asarray(pair["fixed"]), np.asarray(pair["moving"]), samples=0, passes=1, symmetric=False)
    assert result.iterations > 1 and single.iterations == 1
    assert after < field_rmse(single.displacement(), truth, mask=mask)["voxels"]
