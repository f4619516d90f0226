"""``ppreg party`` runs CKKS, FLASH-MPC and point clouds over three real processes (issue 13, finding 9).

Each case starts the dealer, the fixed and the moving party as separate ``ppreg party`` processes
on the loopback interface (all cases at once: the processes mostly wait on each other), and
compares the moving party's output with the in-process secure registration of the same inputs;
three more sessions check that the fixed party refuses, by its ``--policy``, an operation of each
kind. Shapes are tiny (64x64 slices, a few iterations, 20 points).
"""

import contextlib
import json

import numpy as np
import pytest

from ppreg.cli import enable_compilation_cache
from ppreg.data import load_sample
from ppreg.image import Image, load, save
from ppreg.party_cli import party_commands, start_processes, wait_processes
from ppreg.register import register
from ppreg.sampling import n_samples

pytest.importorskip("tenseal")

CKKS = dict(transform="translation", levels=(1,), sampling="urs", fraction=0.2, max_iterations=3, key=3)
FLASH = dict(max_iterations=10, band_size=7, optimizer="flash")  # its first 8 steps are rejected (halved)
EXTENT = 64.0
REFUSED = {  # case: (its options, the fixed party's policy, the rule named)
    "ckks_refused": ("ckks", {"operations": ["mask", "query", "ssd"]}, "operations"),
    "flash_refused": ("flash", {"transforms": ["translation", "rigid", "affine"]}, "transforms"),
    "points_refused": ("points_mpc", {"losses": ["ssd"]}, "losses"),
    # the CKKS B-spline at the default policy: party2 refuses its first level (what R reveals rebuilds J)
    "bspline_ckks_refused": ("bspline_ckks", None, "max_spline_functionals_per_voxel"),
}
# the paper's v1/v2 on a 16 x 16 crop (v1: 2 sub-arrays of 128 values, ~128 rotations each per iteration)
PAPER = {"ckks_v1": dict(transform="translation", levels=(1,), max_iterations=2, key=3),
         "ckks_v2": dict(transform="translation", levels=(1,), max_iterations=3, sampling="urs", fraction=0.5, key=3)}
PAPER_OPT_IN = {"ckks_variants": ["packed", "v1", "v2"]}
SPLINE = dict(transform="bspline", spacing=8, levels=(1,), max_iterations=3, key=3)
SPLINE_URS = dict(SPLINE, sampling="urs", fraction=0.5)
OPT_IN = {"max_spline_functionals_per_voxel": None}  # the fixed party's opt-in policy for the B-spline cases


def _image(name, step, crop=None):
    img = load_sample(name)
    data = np.asarray(img.data)[::step, ::step]
    return Image(data if crop is None else data[crop, crop], img.affine)


def _stored_flipped(img):
    """The same image in world space, stored with its first axis reversed (the affine says so)."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, img.data.shape[0] - 1
    return Image(np.ascontiguousarray(np.asarray(img.data)[::-1]), np.asarray(img.affine) @ flip)


def _rotation(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _points():
    """20 paired 2D landmarks (the default policy's min_samples is 16): party2's are party1's rotated by
    10 degrees, shifted, with noise."""
    rng = np.random.default_rng(5)  # test data, not a mask
    p = rng.uniform(5, 55, (20, 2))
    q = p @ _rotation(10.0).T + np.array([3.0, -4.5]) + rng.normal(0, 0.2, p.shape)
    return p, q


def _args(case):
    if case == "ckks":
        return ["--secure", "ckks", "--transform", "translation", "--levels", "1", "--sampling", "urs",
                "--fraction", "0.2", "--max-iterations", "3", "--seed", "3"]
    if case in PAPER:
        urs = ["--sampling", "urs", "--fraction", "0.5"] if case == "ckks_v2" else []
        return ["--secure", "ckks", "--ckks-variant", case[-2:], "--transform", "translation", "--levels", "1",
                "--max-iterations", str(PAPER[case]["max_iterations"]), "--seed", "3"] + urs
    if case.startswith("bspline_ckks"):
        urs = ["--sampling", "urs", "--fraction", "0.5"] if case == "bspline_ckks_urs" else []
        return ["--secure", "ckks", "--transform", "bspline", "--spacing", "8", "--levels", "1",
                "--max-iterations", "3", "--seed", "3"] + urs
    if case == "flash":
        return ["--transform", "flash", "--levels", "1", "--max-iterations", "10", "--band-size", "7",
                "--optimizer", "flash"]
    return ["--extent", str(EXTENT)] + (["--secure", "ckks"] if case == "points_ckks" else [])


def _commands(work, case, policy=None):
    """The three command lines; point cases pass --points (CSV for the fixed party, .npy for the moving one)."""
    base = REFUSED[case][0] if case in REFUSED else case
    # the dealer hears nothing between setup and end of a CKKS session: its idle timeout spans the session;
    # flash: party1's first evaluations (compilation) took over 60 s with all cases running on 2 loaded cores;
    # 120 s for the rest leaves room for the other pytest-xdist worker on the same cores
    commands = party_commands(work, work / "fixed.nii.gz", work / "moving.nii.gz", work / "out", _args(base),
                              timeout=180 if base.startswith(("bspline", "flash")) or base in PAPER else 120)
    if base.startswith("points"):
        for name, path in (("fixed", work / "fixed.csv"), ("moving", work / "moving.npy")):
            cmd = commands[name]
            i = cmd.index("--image")
            cmd[i:i + 2] = ["--points", str(path)]
    if policy is not None:
        (work / "policy.json").write_text(json.dumps(policy))
        commands["fixed"] += ["--policy", str(work / "policy.json")]
    return commands


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    from ppreg.secure.ckks.points import register_points_ckks
    from ppreg.secure.ckks.session import CkksSession
    from ppreg.secure.protocols.points import register_points
    from ppreg.secure.session import SecureSession

    enable_compilation_cache()  # as `ppreg` does: the processes reuse what the references compile
    images = {"ckks": (_image("BrainProtonDensitySliceBorder20", 4), _image("BrainProtonDensitySliceShifted13x17y", 4)),
              "flash": (_image("BrainProtonDensitySliceBorder20", 4),  # moving stored flipped: resampled via the headers
                        _stored_flipped(_image("BrainProtonDensitySliceBSplined10", 4)))}
    p, q = _points()
    refs = {
        "ckks": register(*images["ckks"], secure="ckks", **CKKS),
        "flash": register(*images["flash"], transform="flash", secure="mpc", max_iterations=FLASH["max_iterations"],
                          flash_options={k: FLASH[k] for k in ("band_size", "optimizer")}),
        "points_mpc": register_points(p, q, SecureSession(16), extent=EXTENT),
        "points_ckks": register_points_ckks(p, q, CkksSession("packed"), extent=EXTENT),
        "bspline_ckks": register(*images["ckks"], secure="ckks", **SPLINE),
        "bspline_ckks_urs": register(*images["ckks"], secure="ckks", **SPLINE_URS),
    }
    runs, procs = {}, {}
    for case in list(refs) + list(REFUSED):
        work = tmp_path_factory.mktemp(case)
        fixed, moving = images["flash" if "flash" in case else "ckks"]
        save(fixed, work / "fixed.nii.gz")
        save(moving, work / "moving.nii.gz")
        np.savetxt(work / "fixed.csv", q, delimiter=",", header="row, column (voxels)")
        np.save(work / "moving.npy", p)
        policy = REFUSED[case][1] if case in REFUSED else (OPT_IN if case.startswith("bspline") else None)
        runs[case] = {"work": work, "ref": refs.get(case), "points": (p, q)}
        procs[case] = start_processes(_commands(work, case, policy))
    with _killed_on_error(procs):
        for case in runs:
            runs[case]["done"] = wait_processes(procs[case], timeout=300)
    return runs


@contextlib.contextmanager
def _killed_on_error(procs):
    """Kill every process of every case still running when the block fails (a timeout in one case's
    wait, a failing reference), instead of leaving the other cases' processes behind."""
    try:
        yield
    except BaseException:
        for group in procs.values():
            for proc in group.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        raise


def _outputs(run):
    for name, proc in run["done"].items():
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    work = run["work"]
    rep = json.loads((work / "out" / "report.json").read_text())
    doc = json.loads((work / "out" / "transform.json").read_text())
    reports = {name: json.loads((work / f"{name}_report.json").read_text()) for name in ("moving", "fixed", "dealer")}
    # traffic as each process counted it from the frames it sent: party2's own report is the moving party's record
    # (offline: the dealer's material party2 received under MPC; the keys and encrypted images it sent under CKKS)
    offline = reports["fixed"]["offline_sent" if rep["secure"] == "ckks" else "offline"]
    assert rep["bytes"]["party2"] == {"online": reports["fixed"]["online"], "offline": offline}
    assert rep["bytes"]["party1"]["online"] > 0 and rep["bytes"]["party2"]["online"] > 0
    return rep, doc, reports


def test_ckks_over_three_processes_equals_in_process(sessions):
    """``--secure ckks``: party2's packed-CKKS steps run in the fixed process (its own image, its own URS
    samples); the dealer only binds the session (setup and end); the result equals ``register(secure="ckks")``
    up to the CKKS noise."""
    run = sessions["ckks"]
    rep, doc, reports = _outputs(run)
    ref = run["ref"]
    assert rep["secure"] == "ckks" and rep["iterations"] == ref.iterations == 3
    np.testing.assert_allclose(np.asarray(doc["matrix"]), ref.matrix, atol=1e-4)
    assert np.max(np.abs(ref.matrix[:2, 2])) > 0.5  # it moved
    assert rep["final_loss"] == pytest.approx(ref.final_loss, rel=1e-4)
    # party2 answered one query per iteration and counted what it revealed: 2 numbers (one column pair) each,
    # plus the final error's pair
    fixed = reports["fixed"]
    assert fixed["ops"]["ckks_query"]["calls"] == 3 and fixed["policy"]["revealed"] == 3 * 2 + 2
    assert set(reports["dealer"]["ops"]) == {"setup"}  # no CKKS operation reaches the dealer (end: after its report)
    # per iteration party1 sends one query of one chunk (a seeded ciphertext, ~64 kB), party2 its reply
    assert 30_000 < rep["bytes_per_iteration"]["party1"] < 200_000
    assert 8 * 8192 < rep["bytes_per_iteration"]["party2"] < 8 * 8194 + 1000


def test_flash_over_three_processes_equals_in_process(sessions):
    """``--transform flash``: every energy evaluation is a ``flash_eval`` operation run by the fixed
    process (its half of the private products and of the band DFT) and the dealer; the result equals
    ``register(transform="flash", secure="mpc")`` to fixed-point rounding. The moving file is stored
    flipped: both start from the headers (party1 resamples it onto the grid party2 announced)."""
    run = sessions["flash"]
    rep, doc, reports = _outputs(run)
    ref = run["ref"]
    assert doc["type"] == "flash" and rep["secure"] == "mpc" and rep["iterations"] == ref.iterations
    assert ref.matrix is not None and np.allclose(doc["matrix"], ref.matrix, atol=1e-6)  # the header start, kept
    warped = load(run["work"] / "out" / "warped.nii.gz").data
    np.testing.assert_allclose(warped, ref.warped, atol=1e-2 * np.abs(ref.warped).max())
    v0 = np.asarray(doc["coefficients_real"]) + 1j * np.asarray(doc["coefficients_imag"])
    assert np.max(np.abs(ref.params)) > 1e-3  # it moved
    np.testing.assert_allclose(v0, ref.params, atol=1e-3 * np.max(np.abs(ref.params)))
    assert rep["final_loss"] == pytest.approx(ref.final_loss, rel=1e-3)
    evals = reports["fixed"]["ops"]["flash_eval"]["calls"]
    assert evals >= ref.iterations and reports["dealer"]["ops"]["flash_eval"]["calls"] == evals
    # party2 counted 2 T^d d + 1 numbers per evaluation and one final error
    assert reports["fixed"]["policy"]["revealed"] == evals * (2 * 7**2 * 2 + 1) + 1


@pytest.fixture(scope="module")
def paper_sessions(tmp_path_factory):
    """The v1 and v2 sessions (their own six processes, started after the tests above are done with
    ``sessions``), while their in-process references run."""
    fixed, moving = (_image("BrainProtonDensitySliceBorder20", 4, slice(18, 34)),
                     _image("BrainProtonDensitySliceShifted13x17y", 4, slice(18, 34)))
    runs, procs = {}, {}
    for case in PAPER:
        work = tmp_path_factory.mktemp(case)
        save(fixed, work / "fixed.nii.gz")
        save(moving, work / "moving.nii.gz")
        runs[case] = {"work": work}
        procs[case] = start_processes(_commands(work, case, PAPER_OPT_IN))
    with _killed_on_error(procs):
        for case, opts in PAPER.items():
            runs[case]["ref"] = register(fixed, moving, secure="ckks", ckks_variant=case[-2:], **opts)
        for case in PAPER:
            runs[case]["done"] = wait_processes(procs[case], timeout=400)
    return runs


@pytest.mark.parametrize("case", sorted(PAPER))
def test_ckks_paper_variants_over_three_processes_equal_in_process(paper_sessions, case):
    """``--secure ckks --ckks-variant v1|v2`` with the fixed party's opt-in policy (``ckks_variants``): party2's
    halves of the paper's protocols (its own fresh key pair; v1: its level encrypted once and sent with its
    Galois keys; v2: ``replicate_P(J_1)`` of each URS sample and of the final error's level) run in the fixed
    process; the result equals ``register(secure="ckks", ckks_variant=...)``'s within 1e-4 px (both carry
    CKKS noise of about 1e-7 relative) and party2 counted exactly ``P`` numbers per query and one final error,
    plus for v2 ``ceil(k / 2)`` per query (``J_2``, readable by a party1 that inflates ``S_2``), and reports the
    bytes it sent offline (v1: its Galois keys and encrypted level)."""
    run = paper_sessions[case]
    rep, doc, reports = _outputs(run)
    ref = run["ref"]
    its = PAPER[case]["max_iterations"]
    assert rep["secure"] == "ckks" and rep["iterations"] == ref.iterations == its
    np.testing.assert_allclose(np.asarray(doc["matrix"]), ref.matrix, atol=1e-4)
    assert np.max(np.abs(ref.matrix[:2, 2])) > 0.1  # it moved
    assert rep["final_loss"] == pytest.approx(ref.final_loss, rel=1e-4)
    fixed = reports["fixed"]
    half = (n_samples(16 * 16, PAPER[case]["fraction"]) + 1) // 2 if case == "ckks_v2" else 0
    assert fixed["ops"]["ckks_query"]["calls"] == its and fixed["policy"]["revealed"] == its * (2 + half) + 1
    assert set(reports["dealer"]["ops"]) == {"setup"}
    if case == "ckks_v2":  # one replicate_P(J_1) per URS sample, one (P = 1) for the final error
        assert fixed["ops"]["ckks_sample"]["calls"] == its + 1 and "ckks_key" in fixed["ops"]
    else:  # v1: party1 sends no key; per iteration one ciphertext of P values, a (2, P) reply back
        assert "ckks_sample" not in fixed["ops"] and "ckks_key" not in fixed["ops"]
        assert rep["bytes_per_iteration"]["party2"] < 200
        assert rep["bytes"]["party2"]["offline"] > 1e6  # the public context with SEAL's Galois keys (~34 MB)


@pytest.mark.parametrize("case", ["bspline_ckks", "bspline_ckks_urs"])
def test_ckks_bspline_over_three_processes_equals_in_process(sessions, case):
    """``--secure ckks --transform bspline`` with the fixed party's opt-in policy: party2's B-spline steps
    (its own key pair, its level encrypted once, or each URS sample; decrypting masked values, ``B^T``) run
    in the fixed process, which counts the ``d P`` functionals of each reply; the coefficients equal
    ``register(secure="ckks")``'s up to the CKKS noise (both within 2^-26 alpha per R value)."""
    run = sessions[case]
    rep, doc, reports = _outputs(run)
    ref = run["ref"]
    assert doc["type"] == "bspline" and rep["secure"] == "ckks" and rep["iterations"] == ref.iterations == 3
    coeffs = np.asarray(doc["coefficients"])
    assert np.max(np.abs(ref.params)) > 0.1  # it moved
    np.testing.assert_allclose(coeffs, ref.params, atol=1e-3)
    assert rep["final_loss"] == pytest.approx(ref.final_loss, rel=1e-3)
    fixed = reports["fixed"]
    d, ctrl = 2, np.asarray(ref.params).shape[:2]
    assert fixed["ops"]["ckks_spline_query"]["calls"] == 3
    assert fixed["policy"]["spline_functionals"] == 3 * d * int(np.prod(ctrl))
    assert fixed["policy"]["revealed"] == 3 * d * int(np.prod(ctrl)) + 2  # plus the final error's pair
    if case == "bspline_ckks_urs":
        assert fixed["ops"]["ckks_spline_sample"]["calls"] == 3
    assert set(reports["dealer"]["ops"]) == {"setup"}


@pytest.mark.parametrize("case", ["points_mpc", "points_ckks"])
def test_points_over_three_processes(sessions, case):
    """``--points`` (CSV for the fixed party, .npy for the moving one): the rigid transform equals the
    in-process secure one (MPC: exactly, L is opened without truncation; CKKS: to its noise) and maps
    party1's points onto party2's within the noise."""
    run = sessions[case]
    rep, doc, reports = _outputs(run)
    mat, _ = run["ref"]
    got = np.asarray(doc["matrix"])
    np.testing.assert_allclose(got, mat, atol=1e-6 if case == "points_mpc" else 1e-4)
    p, q = run["points"]
    moved = np.c_[p, np.ones(len(p))] @ got.T
    assert np.sqrt(np.mean(np.sum((moved[:, :2] - q) ** 2, -1))) < 0.5
    assert rep["secure"] == ("ckks" if case == "points_ckks" else "mpc")
    op = "ckks_points" if case == "points_ckks" else "points"
    assert reports["fixed"]["ops"][op]["calls"] == 1
    assert reports["fixed"]["policy"]["revealed"] == 2 * 2 + 2  # L and q_bar (d = 2: no odd column under CKKS)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fixed_party_refuses_by_its_policy(sessions, case):
    """The fixed process checks each CKKS, FLASH and point-cloud operation against its ``--policy``: the
    session stops with the rule named, and the moving party writes nothing."""
    run = sessions[case]
    rule = REFUSED[case][2]
    for name in ("moving", "fixed"):
        proc = run["done"][name]
        assert proc.returncode == 1, (name, proc.stderr[-1000:])
        assert f"refused by policy rule '{rule}'" in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]
    assert not (run["work"] / "out").exists()


# --- fast checks of the fixed party's side (no processes) --------------------------------------------


def test_ckks_frame_limit_is_derived_from_the_parameters():
    """The fixed party's frame limit covers a CKKS query (6 column pairs of real, serialized ciphertexts,
    measured here against the bound) only when its policy allows a CKKS operation, and stays far below
    the old 1 GiB."""
    from ppreg.secure import policy
    from ppreg.secure.ckks import remote
    from ppreg.secure.ckks.packed import PackedParty1, PackedParty2
    from ppreg.secure.net.channel import InProcessChannel

    channel = InProcessChannel()
    one, two = PackedParty1(channel), PackedParty2(channel)
    two.send_setup()
    one.receive_setup()
    two.receive_key()
    one.query("q", 1, np.full((100, 12), 1e-3))
    channel.recv("party2", "party1", "q/key")
    sizes = channel.recv("party2", "party1", "q/sizes")
    assert sizes.shape == (6, 1) and int(sizes.max()) <= remote.ciphertext_bytes()
    with_ckks = policy.frame_limit(256, 2, policy.DEFAULT, shape=(16, 16))
    mpc_only = policy.frame_limit(256, 2, policy.Policy(operations=("mask", "query", "ssd")), shape=(16, 16))
    assert mpc_only < 6 * int(sizes.max()) <= with_ckks < 1 << 20
    assert remote.frame_bound(256, 2, policy.Policy(operations=("mask", "query", "ssd"))) == 0


def test_fixed_party_refuses_a_second_ckks_setup():
    """A second ``ckks_setup`` (a fresh instance would reset party2's query cap) is refused, under
    any label."""
    from ppreg.secure.ckks import remote  # noqa: F401 - registers the CKKS operations
    from ppreg.secure.net.channel import ProtocolError
    from ppreg.secure.policy import Guard

    guard = Guard("party2", None)
    guard.check({"op": "setup", "frac_bits": 16})
    guard.check({"op": "ckks_setup", "label": "ckks/setup", "variant": "packed"})
    for label in ("ckks/setup", "ckks/setup2"):
        with pytest.raises(ProtocolError, match="ckks"):
            guard.check({"op": "ckks_setup", "label": label, "variant": "packed"})


def test_point_files_csv_and_npy(tmp_path):
    """``--points``: CSV (comma or whitespace, ``#`` comments) and ``.npy`` read the same ``(n, d)``
    array; anything else is a clear error naming the file."""
    from ppreg.party_cli import load_points

    p, _ = _points()
    np.savetxt(tmp_path / "a.csv", p, delimiter=",", header="x, y")
    np.savetxt(tmp_path / "a.txt", p)
    np.save(tmp_path / "a.npy", p)
    for name in ("a.csv", "a.txt", "a.npy"):
        np.testing.assert_allclose(load_points(tmp_path / name), p, rtol=1e-15)
    (tmp_path / "bad.csv").write_text("1,2,3,4\n5,6,7,8\n")
    with pytest.raises(ValueError, match="bad.csv.*d = 2 or 3"):
        load_points(tmp_path / "bad.csv")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="obj.npy"):
        load_points(tmp_path / "obj.npy")


def test_fixed_party_guard_counts_ckks_bspline_functionals():
    """The fixed party's Guard checks the CKKS B-spline operations as the MPC ones: the default policy refuses
    the first level (naming ``max_spline_functionals_per_voxel``); an opted-in budget counts ``d P`` per
    query and refuses the query past it; a sample or query on no open B-spline level is refused."""
    from ppreg.secure.ckks import remote  # noqa: F401 - registers the CKKS operations
    from ppreg.secure.net.channel import ProtocolError
    from ppreg.secure.policy import DEFAULT, Guard, Policy, PolicyError
    from ppreg.secure.roles import key_to_json
    import jax

    level = {"op": "ckks_spline_level", "label": "L0/mask", "n": 32 * 32, "k": 32 * 32, "method": None,
             "shape": [32, 32], "spacing": 8, "sigma": 0.0, "key": key_to_json(jax.random.key(0))}
    functionals = 2 * 7 * 7  # d P: control grid ceil(31 / 8) + 3 = 7 per axis
    for policy, refused in ((DEFAULT, "level"), (Policy(max_spline_functionals_per_voxel=1.5 * functionals / 1024),
                                                 "query")):
        guard = Guard("party2", policy, voxels=32 * 32)
        guard.check({"op": "setup", "frac_bits": 16})
        guard.check({"op": "ckks_spline_setup", "label": "ckks/spline_setup"})
        with pytest.raises(ProtocolError, match="not an open"):
            guard.check({"op": "ckks_spline_sample", "label": "x/J", "mask": "L0/mask", "it": 0})
        if refused == "level":
            with pytest.raises(PolicyError, match="max_spline_functionals_per_voxel"):
                guard.check(level)
            continue
        guard.check(level)
        guard.check({"op": "ckks_spline_query", "label": "L0/it0", "mask": "L0/mask", "it": 0})
        assert guard.spline_functionals == guard.revealed == functionals
        with pytest.raises(PolicyError, match="max_spline_functionals_per_voxel"):
            guard.check({"op": "ckks_spline_query", "label": "L0/it1", "mask": "L0/mask", "it": 1})


def test_fixed_party_guard_bounds_encrypted_samples_per_level():
    """Each ``ckks_spline_sample`` makes party2 encrypt part of its image: a party1 that asks again and
    again without querying is refused past ``max_iterations + 2`` samples on a level (naming the rule);
    a fresh level starts its own count."""
    from ppreg.secure.ckks import remote  # noqa: F401 - registers the CKKS operations
    from ppreg.secure.policy import Guard, Policy, PolicyError
    from ppreg.secure.roles import key_to_json
    import jax

    policy = Policy(max_spline_functionals_per_voxel=1.0, max_iterations=2)
    guard = Guard("party2", policy, voxels=32 * 32)
    guard.check({"op": "setup", "frac_bits": 16})
    guard.check({"op": "ckks_spline_setup", "label": "ckks/spline_setup"})
    for lv in range(2):
        guard.check({"op": "ckks_spline_level", "label": f"L{lv}/mask", "n": 32 * 32, "k": 256, "method": "urs",
                     "shape": [32, 32], "spacing": 8, "sigma": 0.0, "key": key_to_json(jax.random.key(lv))})
        for it in range(4):
            guard.check({"op": "ckks_spline_sample", "label": f"L{lv}/it{it}/J", "mask": f"L{lv}/mask", "it": it})
        with pytest.raises(PolicyError, match="max_iterations"):
            guard.check({"op": "ckks_spline_sample", "label": f"L{lv}/it4/J", "mask": f"L{lv}/mask", "it": 4})


def test_ckks_bspline_frames_fit_the_derived_bound():
    """Every frame of the CKKS B-spline term (party2's public key, an image ciphertext, party1's query,
    party2's reply) fits :func:`~ppreg.secure.ckks.remote.spline_frame_bound` of the grid, which is 0
    when the policy allows none of its operations."""
    from ppreg.secure import policy
    from ppreg.secure.ckks import bspline as cb
    from ppreg.secure.ckks import remote
    from ppreg.secure.net.channel import InProcessChannel
    from ppreg.secure.protocols.bspline import spline_map

    shape = (40, 30)
    n = shape[0] * shape[1]
    bound = remote.spline_frame_bound(n, 2, policy.DEFAULT)
    channel = InProcessChannel()
    two, one = cb.SplineParty2(channel), cb.SplineParty1(channel)
    two.send_keys()
    frames = [channel.recv("party1", "party2", "ckks/params")]
    frames.append(channel.recv("party1", "party2", "ckks/public_key"))
    channel.send("party2", "party1", "ckks/params", frames[0])
    channel.send("party2", "party1", "ckks/public_key", frames[1])
    one.receive_keys()
    count = two.send_image("L0", np.linspace(-1, 1, n))
    frames.append(channel.recv("party1", "party2", "L0/0"))
    channel.send("party2", "party1", "L0/0", frames[-1])
    image = one.receive_image("L0", count)
    pmap = spline_map(shape, 2)  # the smallest spacing: the largest reply
    cb.send_query(one, "q", image, np.full((n, 2), 0.5))
    for label in ("q/key", "q/sizes", "q"):  # party1's query, measured on its way
        frames.append(channel.recv("party2", "party1", label))
        channel.send("party1", "party2", label, frames[-1])
    cb.respond(two, "q", pmap, count, n)
    frames += [channel.recv("party1", "party2", "q")]
    assert max(np.asarray(f).nbytes for f in frames) <= bound < 1 << 21
    assert remote.spline_frame_bound(n, 2, policy.Policy(operations=("mask", "query", "ssd"))) == 0


def test_moving_party_checks_party2s_ckks_parameters():
    """Party2 chooses the packed protocol's public parameters; party1 refuses malformed ones, ones SEAL
    refuses and ones below 128-bit security with a ProtocolError naming them (a session failure, exit
    status 1), never a bare ValueError from SEAL ("bit_sizes is invalid")."""
    from ppreg.secure.ckks.packed import PackedParty1
    from ppreg.secure.net.channel import InProcessChannel, ProtocolError

    bad = {"not uint64": np.asarray([8192.0, 42, 27, np.nan, 60]),
           "a 70-bit modulus": np.asarray([8192, 42, 27, 60, 70], np.uint64),
           "a 1-bit modulus": np.asarray([8192, 42, 27, 60, 1], np.uint64),
           "240 bits at N = 8192": np.asarray([8192, 42, 27, 60, 60, 60, 60], np.uint64),
           "no such ring": np.asarray([2**63, 42, 27, 60, 60], np.uint64),
           "a product scale above q0": np.asarray([8192, 42, 27, 30, 30], np.uint64),
           "too few": np.asarray([8192, 42, 27, 60], np.uint64)}
    for name, params in bad.items():
        channel = InProcessChannel()
        channel.send("party2", "party1", "ckks/params", params)
        channel.send("party2", "party1", "ckks/seed", np.zeros(32, np.uint8))
        with pytest.raises(ProtocolError, match="CKKS parameters"):
            PackedParty1(channel).receive_setup()


def test_fixed_party_runs_one_point_cloud_product_per_session():
    """Each point-cloud product reveals ``d^2`` linear functionals of party2's points with weights party1
    chooses (its own ``Q``), so ``ceil(n / d)`` of them solve for the points, well inside the default
    ``max_revealed_per_voxel``; party2 runs one per session, under any label and either scheme."""
    from ppreg.secure.ckks import remote  # noqa: F401 - registers the CKKS operations
    from ppreg.secure.net.channel import ProtocolError
    from ppreg.secure.policy import DEFAULT, Guard

    points = {"op": "ckks_points", "label": "points", "n": 20, "d": 2, "extent": 64.0}
    for second in (dict(points, label="points2"), dict(points, op="points", label="points3")):
        guard = Guard("party2", DEFAULT, voxels=20)
        guard.check({"op": "setup", "frac_bits": 16})
        guard.check({"op": "ckks_setup", "label": "ckks/setup", "variant": "packed"})
        guard.check(points)
        assert guard.revealed == 2 * 2 + 2
        with pytest.raises(ProtocolError, match="second point-cloud product"):
            guard.check(second)
        assert guard.revealed == 2 * 2 + 2


@pytest.mark.parametrize("option", ["timeout", "max_message_mb"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0])
def test_party_needs_a_finite_timeout_and_message_cap(option, value):
    """``--timeout`` and ``--max-message-mb`` must be positive and finite (``nan`` and ``inf`` parse as floats:
    a receive without a deadline, or a traceback converting them): bad input, before anything runs."""
    import argparse

    from ppreg.party_cli import run_party

    class BadInput(Exception):
        pass

    args = argparse.Namespace(role="dealer", timeout=120.0, max_message_mb=None, policy=None, audit=None)
    setattr(args, option, value)
    with pytest.raises(BadInput, match="positive and finite"):
        run_party(args, BadInput, None, None)
