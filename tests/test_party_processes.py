"""``ppreg party``: dealer, fixed and moving party as three processes on the loopback interface.

Each process pays a Python/JAX start and its compilations, so the runs share them: one fixture
computes the in-process references (filling the persistent compilation cache that ``ppreg``
uses, so the processes load rather than compile the same functions), then runs three sessions
at once (linear SSD with URS, B-spline with GMS, Mattes MI with URS, SVF with the local CC: twelve
processes that mostly wait on each other); a fourth session has its fixed party killed once connected.
"""

import json
import select
import signal
import time

import numpy as np
import pytest

from ppreg.cli import enable_compilation_cache, main
from ppreg.data import load_sample
from ppreg.image import Image, load, load_field, save
from ppreg.itk import LINEAR_MAT, LINEAR_TXT, WARP_FILE
from ppreg.party_cli import party_commands, start_processes, wait_processes
from ppreg.register import register

LINEAR = dict(transform="translation", levels=(1,), sampling="urs", fraction=0.2, max_iterations=3, key=3)
BSPLINE = dict(transform="bspline", spacing=8, levels=(1,), sampling="gms", fraction=0.5, max_iterations=2, key=1)
MI = dict(transform="translation", loss="mi", levels=(1,), sampling="urs", fraction=0.2, max_iterations=3, key=2)
LNCC = dict(transform="svf", loss="lncc", levels=(2, 1), max_iterations=2, symmetric=True)
CASES = {"linear": LINEAR, "bspline": BSPLINE, "mi": MI, "lncc": LNCC}
MOVING = {"linear": "BrainProtonDensitySliceShifted13x17y", "bspline": "BrainProtonDensitySliceBSplined10",
          "mi": "BrainProtonDensitySliceShifted13x17y", "lncc": "BrainProtonDensitySliceBSplined10"}
OPS = {"linear": ("query", 1), "bspline": ("spline_query", 1), "mi": ("mi_grad", 1),
       "lncc": ("lcc_round", 11)}  # (operation, calls per iteration; lncc: the symmetric rounds)


def _args(options):
    args = []
    for name, value in options.items():
        flag = "--seed" if name == "key" else "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
            continue
        args += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args


def _image(name):
    img = load_sample(name)
    return Image(np.asarray(img.data)[::4, ::4], img.affine)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    fixed = _image("BrainProtonDensitySliceBorder20")
    enable_compilation_cache()  # as `ppreg` does: the processes reuse what the references compile
    runs, procs = {}, {}
    for case, options in CASES.items():
        moving = _image(MOVING[case])
        runs[case] = {"work": tmp_path_factory.mktemp(case), "moving": moving,
                      "ref": register(fixed, moving, secure="mpc", **options)}
    for case, options in CASES.items():
        work = runs[case]["work"]
        save(fixed, work / "fixed.nii.gz")
        save(runs[case]["moving"], work / "moving.nii.gz")
        commands = party_commands(work, work / "fixed.nii.gz", work / "moving.nii.gz", work / "out", _args(options),
                                  timeout=120)  # beside the other pytest-xdist worker on 2 cores
        for name in commands:  # each process's audit log (ppreg.secure.audit)
            commands[name] += ["--audit", str(work / f"{name}_audit.jsonl")]
        if case == "bspline":  # party2 and the dealer opt in: their default refuses the B-spline (issue 13)
            (work / "policy.json").write_text(json.dumps({"max_spline_functionals_per_voxel": 1.0}))
            for name in ("fixed", "dealer"):
                commands[name] += ["--policy", str(work / "policy.json")]
        procs[case] = start_processes(commands)
    for case in runs:
        runs[case]["done"] = wait_processes(procs[case], timeout=240)
    return runs


def _check_outputs(run, case, *, rel=1e-6, slack=400):
    """``rel``: the final loss against the in-process run (lncc: each run's dealer rounds its
    truncations afresh); ``slack``: command bytes per iteration on the wire, and the session binding
    every tag carries there (17 bytes per frame)."""
    for name, proc in run["done"].items():
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    out, ref = run["work"] / "out", run["ref"]
    rep = json.loads((out / "report.json").read_text())
    doc = json.loads((out / "transform.json").read_text())
    assert rep["iterations"] == ref.iterations and rep["secure"] == "mpc"
    assert [lv["iterations"] for lv in rep["levels"]] == [lv.iterations for lv in ref.levels]
    assert rep["final_loss"] == pytest.approx(ref.final_loss, rel=rel)
    files = ["displacement.nii.gz", "report.json", "transform.json", "warped.nii.gz"]
    files += [doc[k] for k in ("velocity", "fixed_velocity") if k in doc]
    files += [LINEAR_MAT, LINEAR_TXT] + ([WARP_FILE] if doc["type"] in ("bspline", "svf") else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    # traffic as each process counted it: party2's own report agrees with the moving party's report
    fixed_rep = json.loads((run["work"] / "fixed_report.json").read_text())
    assert rep["bytes"]["party2"] == {"online": fixed_rep["online"], "offline": fixed_rep["offline"]}
    # on the wire party1 also sends the small public commands: a few hundred bytes per iteration at most
    for p in ("party1", "party2"):
        assert ref.bytes_per_iteration[p] <= rep["bytes_per_iteration"][p] <= ref.bytes_per_iteration[p] + slack
    assert rep["time_s"]["party1"] > 0 and rep["time_s"]["party2"] > 0
    # each process's own report: its compute per operation, one query call per iteration
    op_name, per_iteration = OPS[case]
    for name in ("moving", "fixed", "dealer"):
        op = json.loads((run["work"] / f"{name}_report.json").read_text())["ops"][op_name]
        assert op["calls"] == per_iteration * ref.iterations and 0 < op["median_s"] <= op["total_s"]
    return rep, doc


def test_three_processes_equal_in_process_register_linear(sessions):
    run = sessions["linear"]
    _, doc = _check_outputs(run, "linear")
    np.testing.assert_allclose(np.asarray(doc["matrix"]), run["ref"].matrix, atol=1e-6)
    # the moving party's output can be applied as any `ppreg register` output
    work = run["work"]
    assert main(["apply", str(work / "moving.nii.gz"), "-t", str(work / "out" / "transform.json"), "-r",
                 str(work / "fixed.nii.gz"), "-o", str(work / "applied.nii.gz")]) == 0


def test_three_processes_equal_in_process_register_bspline(sessions):
    """B-spline FFD over the network: the followers run the spline handlers (GMS indices via the dealer)."""
    run = sessions["bspline"]
    _, doc = _check_outputs(run, "bspline")
    assert doc["type"] == "bspline" and doc["spacing"] == BSPLINE["spacing"]
    np.testing.assert_allclose(np.asarray(doc["coefficients"]), run["ref"].params, atol=1e-5)
    assert np.max(np.abs(run["ref"].params)) > 0.1  # it moved
    # party1 sends d k ring elements per iteration, party2 one per coefficient
    k = run["ref"].levels[0].n_samples
    assert run["ref"].bytes_per_iteration["party1"] >= 8 * 2 * k
    assert run["ref"].bytes_per_iteration["party2"] >= 8 * run["ref"].params.size


def test_three_processes_equal_in_process_register_mi(sessions):
    """Mattes MI over the network (``--loss mi``): the followers run the MI handlers."""
    run = sessions["mi"]
    _, doc = _check_outputs(run, "mi", slack=600)  # two rounds of commands and seven frames per iteration
    np.testing.assert_allclose(np.asarray(doc["matrix"]), run["ref"].matrix, atol=1e-6)
    assert np.max(np.abs(np.asarray(doc["parameters"]))) > 0.1  # it moved


def test_three_processes_equal_in_process_register_lncc(sessions):
    """Symmetric SVF with the ANTs local CC over the network (``--transform svf --loss lncc --symmetric``):
    eleven rounds per iteration, each party updating its own half velocity; both halves agree with
    the in-process run to fixed-point rounding and the output applies like any ``ppreg register`` one."""
    run = sessions["lncc"]
    _, doc = _check_outputs(run, "lncc", rel=1e-4, slack=11 * 200 + 40 * 17)  # binding: ~40 frames per iteration
    assert doc["type"] == "svf" and doc["fixed_velocity"] == "fixed_velocity.nii.gz"
    out = run["work"] / "out"
    for name, ref in (("velocity.nii.gz", run["ref"].params[0]), ("fixed_velocity.nii.gz", run["ref"].params[1])):
        half, _ = load_field(out / name)
        np.testing.assert_allclose(half, ref, atol=1e-3)
        assert np.max(np.abs(ref)) > 0.1  # each half moved
    # per voxel and iteration party1 sends (21 + 3 d) ring elements (ppreg.secure.protocols.lcc, both forces)
    n = [int(np.prod(lv.shape)) * lv.iterations for lv in run["ref"].levels]
    assert run["ref"].bytes_per_iteration["party1"] >= 27 * 8 * sum(n) / run["ref"].iterations
    work = run["work"]
    assert main(["apply", str(work / "moving.nii.gz"), "-t", str(out / "transform.json"), "-r",
                 str(work / "fixed.nii.gz"), "-o", str(work / "applied.nii.gz")]) == 0
    applied = load(work / "applied.nii.gz").data
    np.testing.assert_allclose(applied, load(out / "warped.nii.gz").data, atol=1e-3 * np.abs(applied).max())


def _audit(run, name):
    return [json.loads(line) for line in (run["work"] / f"{name}_audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", tuple(CASES))
def test_audit_logs_agree_with_the_reports_and_the_protocol(sessions, case):
    """Issue 13 (audit log): each process's ``--audit`` lines, from the real decode points, add up to
    what its report and report.json state, party1's receipts equal what party2's policy counted as
    released (its own formula), and both equal the per-protocol count: ``P`` numbers per Gauss-Newton
    query, ``d`` per control point per B-spline query, ``bins^2 + P`` per MI iteration, ``n d + 1`` per
    lncc iteration (party2: its own ``n d`` force) and ``n d`` for party2's half; one final SSD."""
    run, ref = sessions[case], sessions[case]["ref"]
    for name, proc in run["done"].items():
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    logs = {name: _audit(run, name) for name in ("moving", "fixed", "dealer")}
    reports = {name: json.loads((run["work"] / f"{name}_report.json").read_text()) for name in logs}
    for name, lines in logs.items():
        assert [ln["seq"] for ln in lines] == list(range(1, len(lines) + 1))
        for direction in ("received", "released"):
            mine = [ln for ln in lines if ln["direction"] == direction]
            assert [ln["total"] for ln in mine] == list(np.cumsum([ln["count"] for ln in mine]))
            assert reports[name]["audit"][direction] == sum(ln["count"] for ln in mine)
        assert all(ln["count"] == int(np.prod(ln["shape"])) for ln in lines if ln["direction"] == "received")
    received = {name: reports[name]["audit"]["received"] for name in logs}
    assert {ln["party"] for ln in logs["moving"]} == {"party1"} and received["moving"] > 0
    assert reports["fixed"]["audit"]["released"] == reports["fixed"]["policy"]["revealed"] == received["moving"]
    assert json.loads((run["work"] / "out" / "report.json").read_text())["audit"]["received"] == received["moving"]
    d, its = len(ref.levels[0].shape), ref.iterations
    k = {"linear": ref.params.size, "bspline": ref.params.size, "mi": 32 * 32 + ref.params.size}
    if case == "lncc":
        per_level = [int(np.prod(lv.shape)) * d * lv.iterations for lv in ref.levels]
        full = int(np.prod(ref.levels[-1].shape)) * d
        assert received["moving"] == sum(per_level) + its + full + 1
        assert received["fixed"] == sum(per_level)  # party2's own (smoothed) force each iteration
        assert {ln["name"] for ln in logs["moving"]} >= {"party2's half velocity", "local CC sum"}
        assert any(ln["name"].startswith("smoothed force") for ln in logs["moving"])  # the default mode
    else:
        assert received["moving"] == k[case] * its + 1
        samples = ref.levels[0].n_samples * its if case == "bspline" else 0  # GMS: party1's indices
        assert received["fixed"] == received["dealer"] == samples
        assert sum(ln["iteration"] is not None for ln in logs["moving"]) == its * (2 if case == "mi" else 1)


def test_killed_fixed_party_stops_the_others_cleanly(sessions):
    work = sessions["linear"]["work"]
    out = work / "out_killed"
    commands = party_commands(work, work / "fixed.nii.gz", work / "moving.nii.gz", out, _args(LINEAR), timeout=60)
    procs = start_processes(commands)
    try:
        ready, _, _ = select.select([procs["moving"].stderr], [], [], 120)
        assert ready and "connected" in procs["moving"].stderr.readline()
        procs["fixed"].send_signal(signal.SIGKILL)
        start = time.monotonic()
        results = {n: procs[n].communicate(timeout=60) for n in ("moving", "dealer")}
        elapsed = time.monotonic() - start
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
    assert elapsed < 30  # detected from the dropped connection, well before the 60 s timeout
    for name in ("moving", "dealer"):
        assert procs[name].returncode == 1, (name, results[name])
        err = results[name][1].strip().splitlines()[-1]
        # the moving party may see the dealer leave first (it stops when the fixed party drops): also clean
        lost = ("fixed party", "disconnected", "lost the connection")
        assert err.startswith("ppreg: error: ") and any(s in err for s in lost), err
    assert not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".out_killed")]  # no staging left
