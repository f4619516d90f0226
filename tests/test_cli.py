"""The ``ppreg`` command: outputs, report format, errors without partial output, demo."""

import json
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ppreg.cli import main
from ppreg.data import sample_path

FIXED = sample_path("BrainProtonDensitySliceBorder20")
SHIFTED = sample_path("BrainProtonDensitySliceShifted13x17y")


def _register(tmp_path, *extra, out="out"):
    return main(["register", str(FIXED), str(SHIFTED), "-o", str(tmp_path / out), "--transform", "translation",
                 *extra])


def test_register_writes_outputs(tmp_path, capsys):
    assert _register(tmp_path) == 0
    out = tmp_path / "out"
    transform = json.loads((out / "transform.json").read_text())
    assert transform["type"] == "translation"
    mat = np.asarray(transform["matrix"])
    assert mat.shape == (3, 3)
    np.testing.assert_allclose(mat[:2, 2], [17.0, 13.0], atol=0.05)
    report = json.loads((out / "report.json").read_text())
    assert isinstance(report["iterations"], int) and report["iterations"] > 0
    assert report["final_loss"] < 1.0
    assert [set(lv) >= {"shape", "iterations", "n_samples"} for lv in report["levels"]] == [True] * 3
    assert report["bytes"]["party2"] == {"online": 0, "offline": 0}
    assert set(report["bytes_per_iteration"]) == {"party1", "party2"}
    warped = nib.load(out / "warped.nii.gz")
    fixed = nib.load(FIXED)
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging leftovers
    assert "translation registration" in capsys.readouterr().out


def test_register_mpc_urs_reports_traffic(tmp_path):
    assert _register(tmp_path, "--secure", "mpc", "--sampling", "urs", "--fraction", "0.2", "--max-iterations",
                     "15") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["secure"] == "mpc"
    assert report["bytes"]["party1"]["online"] > 0 and report["bytes"]["party2"]["offline"] > 0
    assert report["bytes_per_iteration"]["party1"] > report["bytes_per_iteration"]["party2"] > 0
    assert report["levels"][-1]["n_samples"] == round(0.2 * 257 * 221)
    assert report["time_s"]["party2"] > 0


def _assert_error(capsys, status, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("ppreg: error:") and needle in err[0]


def test_missing_file(tmp_path, capsys):
    status = main(["register", str(tmp_path / "nope.nii.gz"), str(SHIFTED), "-o", str(tmp_path / "out")])
    _assert_error(capsys, status, "no such file")
    assert not (tmp_path / "out").exists()


def test_2d_vs_3d(tmp_path, capsys):
    nib.save(nib.Nifti1Image(np.ones((6, 7, 8), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    status = main(["register", str(FIXED), str(tmp_path / "vol.nii.gz"), "-o", str(tmp_path / "out")])
    _assert_error(capsys, status, "3D")
    assert not (tmp_path / "out").exists()


def test_non_finite_voxels(tmp_path, capsys):
    data = nib.load(FIXED).get_fdata().astype(np.float32)
    data[10, 10] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "bad.nii.gz")
    status = main(["register", str(FIXED), str(tmp_path / "bad.nii.gz"), "-o", str(tmp_path / "out")])
    _assert_error(capsys, status, "non-finite")
    assert not (tmp_path / "out").exists()


def test_unreadable_file(tmp_path, capsys):
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file")
    status = main(["register", str(FIXED), str(tmp_path / "junk.nii.gz"), "-o", str(tmp_path / "out")])
    _assert_error(capsys, status, "junk.nii.gz")


@pytest.mark.parametrize("argv", [["register", "a", "b"], ["register", "a", "b", "-o", "x", "--transform", "warp"],
                                  ["register", "a", "b", "-o", "x", "--levels", "4,0"],
                                  ["register", "a", "b", "-o", "x", "--max-iterations", "10,x"], ["frobnicate"]])
def test_bad_arguments_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppreg: error:")


def test_register_help_states_the_defaults_register_uses(capsys):
    """The numbers ``ppreg register --help`` quotes are the ones registration resolves (they once drifted:
    the help said diffusion weight 0.1 after the dense default became 0.3)."""
    from ppreg.methods import resolve_options
    from ppreg.learned.suits_register import DEFAULT_LAM
    from ppreg.options import VXM_PASSES

    with pytest.raises(SystemExit):
        main(["register", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    text = re.sub(r"(\w)- (\w)", r"\1-\2", text)  # argparse may wrap a line after a hyphen ("vxm- diff")
    dense = resolve_options("dense", "lncc", (4, 2, 1), {})
    bspline = resolve_options("bspline", "ssd", (4, 2, 1), {})
    svf = resolve_options("svf", "lncc", (4, 2, 1), {})
    svf_ssd = resolve_options("svf", "ssd", (4, 2, 1), {})
    rigid = resolve_options("rigid", "ssd", (4, 2, 1), {})
    assert f"dense: diffusion weight (default {dense['regularization']})" in text
    bspline_lncc = resolve_options("bspline", "lncc", (4, 2, 1), {})
    assert (f"bending-energy weight (default {bspline['regularization']} with ssd, "
            f"{bspline_lncc['regularization']} with another loss)") in text
    assert f"suits: diffusion weight lambda of each Gauss-Newton update (default {DEFAULT_LAM:g})" in text
    assert f"level voxels ({svf['step_size']}); dense: Adam learning rate ({dense['step_size']})" in text
    adam = resolve_options("dense", "lncc", (4, 2, 1), {"optimizer": "adam"})
    assert (f"(default {rigid['max_iterations']} linear, {bspline['max_iterations']} bspline (ssd), "
            f"{bspline_lncc['max_iterations']} bspline (other losses, L-BFGS); svf: "
            f"{svf['max_iterations'][0]}, {svf['max_iterations'][-1]} (lncc) or {svf_ssd['max_iterations'][-1]} "
            f"at full resolution; dense: "
            f"{dense['max_iterations'][0]}, {dense['max_iterations'][-1]} at full resolution {dense['optimizer']}, "
            f"{adam['max_iterations'][0]}, {adam['max_iterations'][-1]} at full resolution adam; vxm-diff: network "
            f"passes, {VXM_PASSES[2]} in 2D, {VXM_PASSES[3]} in 3D)") in text
    assert f"dense: optax optimiser ({dense['optimizer']})" in text


def test_starting_ppreg_leaves_the_learned_and_secure_stacks_to_their_subcommands(capsys):
    """Every ``ppreg`` command imports ``ppreg.cli``; the learned networks (equinox) and the secure parties
    (TenSEAL, the protocols, ZeroMQ and the key files) load only in the subcommands that run them (about
    0.6 s of a 3.4-s start, DESIGN.md items 50-51), while ``ppreg train --help`` still quotes the defaults
    training uses."""
    from ppreg.learned.recipes import DEFAULT_LOSS

    script = ("import sys, ppreg.cli; print(sorted(m for m in ('ppreg.learned', 'ppreg.secure', 'equinox', "
              "'tenseal', 'zmq') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"sigma_I of the image term (default {DEFAULT_LOSS.image_sigma})" in text
    assert f"prior precision lambda ({DEFAULT_LOSS.lam})" in text


def test_rerun_removes_stale_outputs_of_an_earlier_run_only(tmp_path):
    """A rigid rerun into an svf run's folder must not leave the svf warp beside the new linear transform
    (a user applying both would get the old deformation); files the earlier run did not list stay."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("velocity.nii.gz", "itk_warp.nii.gz", "notes.txt"):
        (out / name).write_text("earlier")
    (tmp_path / "outside.txt").write_text("keep")
    (out / "report.json").write_text(json.dumps({"files": ["velocity.nii.gz", "itk_warp.nii.gz", "warped.nii.gz",
                                                           "../outside.txt", "/etc/hostname", 3]}))
    assert _register(tmp_path) == 0
    names = {p.name for p in out.iterdir()}
    assert "velocity.nii.gz" not in names and "itk_warp.nii.gz" not in names
    assert "notes.txt" in names and (tmp_path / "outside.txt").read_text() == "keep"
    listed = json.loads((out / "report.json").read_text())["files"]
    assert "itk_linear.mat" in listed and set(listed) == names - {"notes.txt"}


def test_point_cloud_outputs_replace_an_earlier_image_run(tmp_path):
    """``ppreg party moving --points`` writes into the same kind of folder: an earlier image run's listed
    files (its warp) go, the new report lists the point run's two files, the user's own files stay."""
    from types import SimpleNamespace

    from ppreg.party_cli import _write_points

    out = tmp_path / "out"
    out.mkdir()
    for name in ("warped.nii.gz", "itk_linear.mat", "notes.txt"):
        (out / name).write_text("earlier")
    (out / "report.json").write_text(json.dumps({"files": ["warped.nii.gz", "itk_linear.mat", "report.json"]}))
    result = SimpleNamespace(transform_json=lambda: {"type": "rigid"}, report_json=lambda: {"rmse": 0.5})
    _write_points(out, result)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.json", "transform.json"]
    assert json.loads((out / "report.json").read_text()) == {"rmse": 0.5, "files": ["report.json", "transform.json"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_failure_keeps_existing_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    status = main(["register", str(FIXED), str(SHIFTED), "-o", str(out), "--levels", "400"])
    _assert_error(capsys, status, "too large")
    assert (out / "report.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_compilation_cache_setting(tmp_path, monkeypatch):
    from ppreg.cli import enable_compilation_cache

    assert enable_compilation_cache() is None  # the suite turns it off
    monkeypatch.setenv("PPREG_COMPILATION_CACHE", "1")
    monkeypatch.setenv("PPREG_CACHE_DIR", str(tmp_path / "cache"))
    import jax

    previous = jax.config.jax_compilation_cache_dir
    try:
        assert enable_compilation_cache() == tmp_path / "cache"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
