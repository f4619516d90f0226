"""``ppreg batch``: one folder per pair as ``ppreg register`` writes, a summary with Dice and folding, bad rows
reported without stopping the others, resumable."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from ppreg import load, mean_dice, register
from ppreg.cli import main
from ppreg.data import load_sample

OPTIONS = ["--transform", "affine", "--levels", "2,1", "--no-progress"]


def _tiny(name):
    """A bundled slice shrunk 5x (about 51 x 44): fast, still a brain."""
    return np.asarray(load_sample(name).data, np.float32)[::5, ::5]


def _save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), path)
    return path.name


@pytest.fixture()
def case(tmp_path):
    fixed, moving = _tiny("BrainProtonDensitySliceBorder20"), _tiny("BrainProtonDensitySliceShifted13x17y")
    labels = lambda x: (x > 60).astype(np.int16) + (x > 140).astype(np.int16)  # noqa: E731
    names = {"f": _save(tmp_path / "f.nii.gz", fixed), "m": _save(tmp_path / "m.nii.gz", moving),
             "fl": _save(tmp_path / "fl.nii.gz", labels(fixed)), "ml": _save(tmp_path / "ml.nii.gz", labels(moving))}
    bad = moving.copy()
    bad[5, 5] = np.nan
    names["nan"] = _save(tmp_path / "nan.nii.gz", bad)
    rows = [("a", "f", "m", "fl", "ml"), ("b", "f", "absent.nii.gz", "", ""), ("c", "f", "nan", "", ""),
            ("d", "m", "f", "", "")]
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "fixed", "moving", "fixed_labels", "moving_labels"])
        for pid, f, m, fl, ml in rows:
            w.writerow([pid, names.get(f, f), names.get(m, m), names.get(fl, fl), names.get(ml, ml)])
    return tmp_path, fixed, moving, labels


def test_batch_writes_pairs_summary_and_resumes(case):
    tmp, fixed, moving, labels = case
    out = tmp / "out"
    assert main(["batch", str(tmp / "pairs.csv"), "-o", str(out), *OPTIONS]) == 1  # two bad rows
    summary = {r["id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert [r["id"] for r in json.loads((out / "summary.json").read_text())] == ["a", "b", "c", "d"]
    assert summary["a"]["status"] == summary["d"]["status"] == "ok"
    assert "no such file" in summary["b"]["error"] and "non-finite" in summary["c"]["error"]
    assert not (out / "b" / "done.json").exists() and not (out / "c" / "done.json").exists()
    # the same files as ppreg register, and the same registration as register()
    for name in ("warped.nii.gz", "displacement.nii.gz", "transform.json", "report.json", "itk_linear.mat"):
        assert (out / "a" / name).is_file()
    single = register(load(tmp / "f.nii.gz"), load(tmp / "m.nii.gz"), transform="affine", levels=(2, 1))
    np.testing.assert_allclose(nib.load(out / "a" / "warped.nii.gz").get_fdata(), single.warped,
                               atol=1e-5 * float(fixed.max()))
    # Dice of the label maps went up from the unregistered pair; no folding; a time
    before = mean_dice(labels(fixed), labels(moving))  # 0.42
    assert float(summary["a"]["dice"]) > before + 0.1  # 0.57 (label 1 is a thin band)
    assert summary["a"]["folding"] == "0" and float(summary["a"]["time_s"]) > 0
    assert summary["d"]["dice"] == ""
    # resume: finished rows are skipped (their files untouched), the fixed bad row now runs
    stamp = (out / "a" / "warped.nii.gz").stat().st_mtime_ns
    _save(tmp / "nan.nii.gz", moving)
    assert main(["batch", str(tmp / "pairs.csv"), "-o", str(out), *OPTIONS]) == 1  # b still missing
    assert (out / "a" / "warped.nii.gz").stat().st_mtime_ns == stamp
    summary = {r["id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert summary["c"]["status"] == "ok" and (out / "c" / "done.json").is_file()
    assert summary["a"]["dice"] != "" and summary["b"]["status"] == "error"


@pytest.mark.parametrize("text, message", [("fixed,image\nf.nii.gz,m.nii.gz\n", "missing ['moving']"),
                                           ("fixed,moving,id\nf.nii.gz,m.nii.gz,../x\n", "not a safe folder name"),
                                           ("fixed,moving\n", "no pairs")])
def test_bad_csv_exits_2(tmp_path, capsys, text, message):
    (tmp_path / "pairs.csv").write_text(text)
    assert main(["batch", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "out"), *OPTIONS]) == 2
    assert message in capsys.readouterr().err


def test_secure_refused(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("fixed,moving\nf.nii.gz,m.nii.gz\n")
    assert main(["batch", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "out"), "--secure", "mpc"]) == 2
    assert "clear registration" in capsys.readouterr().err
