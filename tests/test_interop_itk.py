"""ITK/ANTs interop (issue 15): ppreg writes its transform as ITK files (nitransforms), a peer applying
them (SimpleITK) reproduces ppreg's warped image, and ``ppreg apply`` reads them."""

import json

import nibabel as nib
import numpy as np
import pytest
from world_helpers import grid_of, resample_world, rigid, rotation, small_2d, small_3d, world_rms

from ppreg.cli import main
from ppreg.image import save
from ppreg.itk import FSL_MAT, LINEAR_MAT, LINEAR_TXT, LTA_FILE, WARP_FILE, read_itk
from ppreg.space import world_affine

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def case3d(tmp_path_factory):
    """Colin27 at 4 mm (fixed) against a copy rotated 5 degrees and shifted in world, on a grid with swapped,
    flipped axes and 4 x 5 x 4 mm voxels; ``ppreg register --transform rigid+svf --levels 1`` on it."""
    tmp = tmp_path_factory.mktemp("itk3d")
    fixed = small_3d()
    w = world_affine(fixed, 3)
    centre = w[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2.0) + w[:3, 3]
    truth = rigid(rotation(5, (1, 2, 0.5)), (3.0, -2.0, 4.0), centre)
    affine, shape = grid_of(fixed, (2, 0, 1), (False, True, False), (4.0, 5.0, 4.0))
    moving = resample_world(fixed, affine, shape, motion=truth)
    save(fixed, tmp / "fixed.nii.gz")
    save(moving, tmp / "moving.nii.gz")
    out = tmp / "out"
    assert main(["register", str(tmp / "fixed.nii.gz"), str(tmp / "moving.nii.gz"), "-o", str(out),
                 "--transform", "rigid+svf", "--loss", "ssd", "--levels", "1", "--max-iterations", "5"]) == 0
    return tmp, out, truth


def test_itk_files_are_written_in_lps(case3d):
    tmp, out, truth = case3d
    for name in (LINEAR_MAT, LINEAR_TXT, WARP_FILE):
        assert (out / name).exists()
    doc = json.loads((out / "transform.json").read_text())
    world = np.asarray(doc["world_matrix"])
    # the known world motion within a quarter voxel (1 mm) RMS over the fixed grid; measured 0.53 mm, and
    # 0.56 mm for the same motion on the fixed grid itself (the error is the 4 mm resampling, not the header)
    assert world_rms(world, truth, small_3d()) < 1.0
    for name in (LINEAR_MAT, LINEAR_TXT):  # nitransforms reads back the RAS matrix
        pts = np.random.default_rng(0).normal(scale=50.0, size=(5, 3))
        np.testing.assert_allclose(read_itk(out / name)(pts), pts @ world[:3, :3].T + world[:3, 3], atol=1e-4)
    text = (out / LINEAR_TXT).read_text()
    assert text.startswith("#Insight Transform File V1.0") and "AffineTransform_float_3_3" in text
    field = nib.load(out / WARP_FILE)
    assert field.shape[3:] == (1, 3) and field.header.get_intent()[0] == "vector"


def test_simpleitk_applying_ppreg_output_gives_ppreg_warped(case3d):
    """SimpleITK resamples the moving image with itk_linear.mat after itk_warp.nii.gz (a CompositeTransform):
    equal to warped.nii.gz within 2e-5 of the intensity range on the voxels that map half a voxel or more
    inside the moving grid (measured: 1.3e-6 with the .mat, 6e-6 with the .txt, whose numbers ITK writes with
    6 digits; also on every voxel here). The linear file alone differs by 108 (of 128): the field matters."""
    sitk = pytest.importorskip("SimpleITK")
    tmp, out, _ = case3d
    fixed = sitk.ReadImage(str(tmp / "fixed.nii.gz"), sitk.sitkFloat64)
    moving = sitk.ReadImage(str(tmp / "moving.nii.gz"), sitk.sitkFloat64)
    for linear in (LINEAR_MAT, LINEAR_TXT):
        field = sitk.ReadImage(str(out / WARP_FILE), sitk.sitkVectorFloat64)
        composite = sitk.CompositeTransform([sitk.ReadTransform(str(out / linear)),
                                             sitk.DisplacementFieldTransform(field)])
        peer = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0)).T
        ours = nib.load(out / "warped.nii.gz").get_fdata()
        inside = _inside(out, tmp, margin=0.5)
        assert inside.mean() > 0.5
        err = np.abs(peer - ours)[inside].max()
        assert err < 2e-5 * np.ptp(ours)


def _fsl_coordinates(img) -> np.ndarray:
    """FSL's voxel -> "scaled voxel" matrix of an image, written out from FSL's definition (FLIRT FAQ): voxel
    index times voxel size, with the first axis reversed when the voxel -> world matrix has a positive
    determinant (neurological storage)."""
    zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
    flip = np.eye(4)
    if np.linalg.det(img.affine[:3, :3]) > 0:
        flip[0, 0], flip[0, 3] = -1.0, img.shape[0] - 1
    return np.diag([*zooms, 1.0]) @ flip


def test_fsl_and_lta_linear_files(case3d):
    """fsl_linear.mat is FLIRT's moving -> fixed matrix in scaled-voxel coordinates, computed here from FSL's
    definition and the world matrix (the moving grid has permuted, flipped axes); linear.lta reads back as
    the same RAS-to-RAS matrix, with both volumes' geometry."""
    from nitransforms.io import lta

    tmp, out, _ = case3d
    fixed, moving = nib.load(tmp / "fixed.nii.gz"), nib.load(tmp / "moving.nii.gz")
    world = np.asarray(json.loads((out / "transform.json").read_text())["world_matrix"])
    fixed_to_moving = (_fsl_coordinates(moving) @ np.linalg.inv(moving.affine) @ world @ fixed.affine
                       @ np.linalg.inv(_fsl_coordinates(fixed)))
    np.testing.assert_allclose(np.loadtxt(out / FSL_MAT), np.linalg.inv(fixed_to_moving), atol=1e-4)
    read = lta.FSLinearTransform.from_filename(str(out / LTA_FILE))
    np.testing.assert_allclose(read.to_ras(), world, atol=1e-4)
    text = (out / LTA_FILE).read_text()
    src, dst = text.split("src volume info")[1].split("dst volume info")
    assert "volume = {} {} {}".format(*fixed.shape) in src and "volume = {} {} {}".format(*moving.shape) in dst


def _inside(out, tmp, margin):
    """Fixed voxels whose point (ppreg apply's coordinates) lies ``margin`` voxels inside the moving grid."""
    from ppreg.cli import _itk_coords
    from ppreg.image import load

    moving, fixed = load(tmp / "moving.nii.gz"), load(tmp / "fixed.nii.gz")
    coords = _itk_coords([out / WARP_FILE, out / LINEAR_MAT], fixed, moving)
    upper = np.asarray(moving.shape) - 1 - margin
    return np.all((coords >= margin) & (coords <= upper), axis=-1)


def test_ppreg_apply_reads_itk_files(case3d, tmp_path):
    """``ppreg apply -t itk_warp.nii.gz -t itk_linear.mat`` (antsApplyTransforms order) gives warped.nii.gz;
    the other order is another map."""
    tmp, out, _ = case3d
    ours = nib.load(out / "warped.nii.gz").get_fdata()
    for order, same in (((WARP_FILE, LINEAR_MAT), True), ((LINEAR_MAT, WARP_FILE), False)):
        applied = tmp_path / "applied.nii.gz"
        args = [a for name in order for a in ("-t", str(out / name))]
        assert main(["apply", str(tmp / "moving.nii.gz"), *args, "-r", str(tmp / "fixed.nii.gz"),
                     "-o", str(applied)]) == 0
        err = np.abs(nib.load(applied).get_fdata() - ours).max()
        assert (err < 1e-3 * np.ptp(ours)) == same, (order, err)


def test_ants_applying_ppreg_output_gives_ppreg_warped(case3d):
    """antsApplyTransforms (ANTsPy) with ``-t itk_warp.nii.gz -t itk_linear.mat`` reproduces warped.nii.gz on
    the voxels that map inside the moving grid (measured: 3.8e-6 of the intensity range; the other order is
    off by 0.53 of it). ``whichtoinvert`` is explicit: ANTsPy inverts a ``.mat`` listed first before a field
    by default."""
    ants = pytest.importorskip("ants")
    tmp, out, _ = case3d
    fixed, moving = ants.image_read(str(tmp / "fixed.nii.gz")), ants.image_read(str(tmp / "moving.nii.gz"))
    peer = ants.apply_transforms(fixed, moving, transformlist=[str(out / WARP_FILE), str(out / LINEAR_MAT)],
                                 whichtoinvert=[False, False]).numpy()
    ours = nib.load(out / "warped.nii.gz").get_fdata()
    inside = _inside(out, tmp, margin=0.5)
    assert np.abs(peer - ours)[inside].max() < 2e-5 * np.ptp(ours)


def test_apply_rejects_mixed_and_missing_transforms(case3d, tmp_path, capsys):
    tmp, out, _ = case3d
    args = ["apply", str(tmp / "moving.nii.gz"), "-r", str(tmp / "fixed.nii.gz"), "-o", str(tmp_path / "a.nii.gz")]
    assert main(args[:2] + ["-t", str(out / LINEAR_MAT), "-t", str(out / "transform.json")] + args[2:]) == 2
    assert "cannot be chained" in capsys.readouterr().err
    assert main(args[:2] + ["-t", str(tmp_path / "none.mat")] + args[2:]) == 2
    assert "no such transform file" in capsys.readouterr().err


def test_2d_linear_itk_round_trip(tmp_path):
    """2D: the ITK files hold the 3D embedding (z the identity); ppreg apply reading them reproduces warped."""
    fixed = small_2d()
    affine, shape = grid_of(fixed, (1, 0), (True, False), (2.0, 2.0))
    w = world_affine(fixed, 2)
    centre = w[:2, :2] @ ((np.asarray(fixed.shape) - 1) / 2.0) + w[:2, 2]
    moving = resample_world(fixed, affine, shape, motion=rigid(rotation(4), (3.0, 2.0), centre))
    save(fixed, tmp_path / "fixed.nii.gz")
    save(moving, tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
                 "--init", "center"]) == 0
    assert not (out / WARP_FILE).exists()
    applied = tmp_path / "applied.nii.gz"
    assert main(["apply", str(tmp_path / "moving.nii.gz"), "-t", str(out / LINEAR_TXT), "-r",
                 str(tmp_path / "fixed.nii.gz"), "-o", str(applied)]) == 0
    ours = nib.load(out / "warped.nii.gz").get_fdata()
    np.testing.assert_allclose(nib.load(applied).get_fdata(), ours, atol=1e-3 * np.ptp(ours))


def test_2d_deformable_on_other_grids_round_trips(tmp_path):
    """svf between images on different grids (swapped, flipped axes): transform.json carries the header start
    and ``ppreg apply`` reproduces warped.nii.gz from it and from the ITK files (2D, embedded in 3D)."""
    fixed = small_2d()
    affine, shape = grid_of(fixed, (1, 0), (True, False), (2.0, 2.0))
    save(fixed, tmp_path / "fixed.nii.gz")
    save(resample_world(fixed, affine, shape, order=1), tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    assert main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
                 "--transform", "svf", "--levels", "2,1", "--max-iterations", "3"]) == 0
    assert "matrix" in json.loads((out / "transform.json").read_text())
    ours = nib.load(out / "warped.nii.gz").get_fdata()
    for transforms in ([out / "transform.json"], [out / WARP_FILE, out / LINEAR_MAT]):
        applied = tmp_path / "applied.nii.gz"
        args = [a for t in transforms for a in ("-t", str(t))]
        assert main(["apply", str(tmp_path / "moving.nii.gz"), *args, "-r", str(tmp_path / "fixed.nii.gz"),
                     "-o", str(applied)]) == 0
        np.testing.assert_allclose(nib.load(applied).get_fdata(), ours, atol=1e-3 * np.ptp(ours))
