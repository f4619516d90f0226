"""Issue 13 (audit log): ``--audit FILE`` records every quantity opened to a party (ppreg.secure.audit).

The three-process runs are checked in tests/test_party_processes.py; here the in-process run of
``ppreg register --secure mpc --audit`` and the early refusal of a path that cannot be written.
"""

import json

import numpy as np
import pytest

from ppreg.cli import main
from ppreg.data import load_sample
from ppreg.image import Image, save
from ppreg.secure.audit import AuditLog


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    work = tmp_path_factory.mktemp("audit")
    for name, sample in (("fixed", "BrainProtonDensitySliceBorder20"), ("moving", "BrainProtonDensitySliceShifted13x17y")):
        img = load_sample(sample)
        save(Image(np.asarray(img.data)[::4, ::4], img.affine), work / f"{name}.nii.gz")
    return work


def test_register_in_process_writes_the_audit_log(pair):
    """Linear SSD in one process: party1 receives ``P`` numbers per Gauss-Newton query and one final error;
    party2's policy record (released) says the same; report.json carries party1's total."""
    log, out = pair / "audit.jsonl", pair / "out"
    assert main(["register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "-o", str(out), "--secure",
                 "mpc", "--transform", "translation", "--levels", "1", "--max-iterations", "3",
                 "--audit", str(log)]) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    its = report["iterations"]
    received = [ln for ln in lines if ln["party"] == "party1" and ln["direction"] == "received"]
    released = [ln for ln in lines if ln["party"] == "party2" and ln["direction"] == "released"]
    assert [(ln["op"], ln["iteration"], ln["shape"]) for ln in received] == (
        [("query", i, [2]) for i in range(its)] + [("ssd", None, [1])])
    assert received[-1]["total"] == released[-1]["total"] == 2 * its + 1 == report["audit"]["received"]
    assert not [ln for ln in lines if ln["party"] == "party2" and ln["direction"] == "received"]


def test_an_audit_path_that_cannot_be_written_is_refused_before_anything_runs(pair, tmp_path, capsys):
    bad = tmp_path / "missing" / "audit.jsonl"
    with pytest.raises(ValueError, match="cannot write the audit log .*missing"):
        AuditLog(bad)
    # ppreg party: refused before the keys are read or a peer is reached (exit 2, one line)
    code = main(["party", "--role", "dealer", "--key", str(tmp_path / "none.key"), "--audit", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"ppreg: error: dealer: cannot write the audit log {bad}: No such file or directory"]
    # ppreg register: refused before the registration runs; and an audit log only goes with a secure run
    for secure, message in (("mpc", "cannot write the audit log"), ("none", "secure (mpc) run")):
        code = main(["register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "-o", str(tmp_path / "o"),
                     "--secure", secure, "--audit", str(bad)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
