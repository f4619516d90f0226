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
                                           ("fixed,moving\n", "no pairs"),
                                           ("fixed,moving,id\nf.nii.gz,m.nii.gz,summary.csv\n", "not a safe folder"),
                                           ("fixed,moving,id\nf,m,A\nf,m,a\n", "'a' is repeated (ignoring case)"),
                                           ("fixed,moving,moving\nf,m,m2\n", "repeated ['moving']")])
def test_bad_csv_exits_2(tmp_path, capsys, text, message):
    (tmp_path / "pairs.csv").write_text(text)
    assert main(["batch", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "out"), *OPTIONS]) == 2
    assert message in capsys.readouterr().err


def test_secure_refused(tmp_path, capsys):
    (tmp_path / "pairs.csv").write_text("fixed,moving\nf.nii.gz,m.nii.gz\n")
    assert main(["batch", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "out"), "--secure", "mpc"]) == 2
    assert "clear registration" in capsys.readouterr().err


def test_resume_registers_a_row_again_when_its_pair_or_options_changed(case):
    """done.json names its pair and options: a default id that now names another pair (the CSV edited) or other
    options are not "finished"; the stale marker goes, so a failing new pair leaves none."""
    tmp = case[0]
    out = tmp / "out"
    csv_path = tmp / "edited.csv"
    csv_path.write_text("fixed,moving\nf.nii.gz,m.nii.gz\n")
    assert main(["batch", str(csv_path), "-o", str(out), *OPTIONS]) == 0
    assert json.loads((out / "0001" / "done.json").read_text())["pair"]["moving"] == str(tmp / "m.nii.gz")
    csv_path.write_text("fixed,moving\nf.nii.gz,absent.nii.gz\n")  # row 0001 is now another pair
    assert main(["batch", str(csv_path), "-o", str(out), *OPTIONS]) == 1
    row = json.loads((out / "summary.json").read_text())[0]
    assert row["status"] == "error" and "no such file" in row["error"]
    assert not (out / "0001" / "done.json").exists()
    csv_path.write_text("fixed,moving\nm.nii.gz,f.nii.gz\n")
    assert main(["batch", str(csv_path), "-o", str(out), *OPTIONS]) == 0
    done = json.loads((out / "0001" / "done.json").read_text())
    assert done["pair"]["fixed"] == str(tmp / "m.nii.gz") and done["options"]["transform"] == "affine"
    stamp = (out / "0001" / "warped.nii.gz").stat().st_mtime_ns
    assert main(["batch", str(csv_path), "-o", str(out), *OPTIONS, "--transform", "rigid"]) == 0  # other options
    assert (out / "0001" / "warped.nii.gz").stat().st_mtime_ns != stamp
    assert json.loads((out / "0001" / "done.json").read_text())["options"]["transform"] == "rigid"


def test_bad_label_maps_and_byte_order_mark(case):
    """A label map off its image's grid or empty is a bad row named in the summary (not a wrong Dice, not an
    error after the registration); a spreadsheet's UTF-8 byte-order mark before the header is accepted."""
    tmp, _, moving, labels = case
    _save(tmp / "ml_small.nii.gz", labels(moving)[:30, :30])
    _save(tmp / "empty.nii.gz", np.zeros_like(labels(moving)))
    (tmp / "bom.csv").write_text("\ufefffixed,moving,fixed_labels,moving_labels\n"
                                 "f.nii.gz,m.nii.gz,fl.nii.gz,ml_small.nii.gz\nf.nii.gz,m.nii.gz,empty.nii.gz,ml.nii.gz\n",
                                 encoding="utf-8")
    assert main(["batch", str(tmp / "bom.csv"), "-o", str(tmp / "out"), *OPTIONS]) == 1
    rows = json.loads((tmp / "out" / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["error", "error"]
    assert "moving_labels" in rows[0]["error"] and "has shape (30, 30) but the moving image" in rows[0]["error"]
    assert "fixed_labels" in rows[1]["error"] and "empty" in rows[1]["error"]


def test_one_label_map_and_a_failing_batch_are_row_errors(case, monkeypatch):
    """A row with one label map is a bad row (no silent Dice of None); a batch that fails as a whole (an XLA
    runtime error such as out of memory) fails its own pairs, and the summary is still written."""
    tmp, *_ = case
    (tmp / "one.csv").write_text("fixed,moving,fixed_labels,moving_labels\nf.nii.gz,m.nii.gz,fl.nii.gz,\n")
    assert main(["batch", str(tmp / "one.csv"), "-o", str(tmp / "o1"), *OPTIONS]) == 1
    (row,) = json.loads((tmp / "o1" / "summary.json").read_text())
    assert row["status"] == "error" and "fixed_labels but no moving_labels" in row["error"]

    import ppreg.batch

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(ppreg.batch, "register_batch", out_of_memory)
    (tmp / "two.csv").write_text("fixed,moving\nf.nii.gz,m.nii.gz\nm.nii.gz,f.nii.gz\n")
    assert main(["batch", str(tmp / "two.csv"), "-o", str(tmp / "o2"), *OPTIONS]) == 1
    rows = json.loads((tmp / "o2" / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["error", "error"]
    assert all("out of memory" in r["error"] and "--batch-size" in r["error"] for r in rows)
