"""``ppreg keygen`` and ``ppreg party``: one secure-registration role per process; ``ppreg demo --processes``.

::

    ppreg keygen NAME                      # NAME.key (secret, 0600) and NAME.pub
    ppreg party --role dealer --listen HOST:PORT --key dealer.key --peers moving.pub fixed.pub [--policy FILE]
    ppreg party --role moving --image I.nii.gz --listen HOST:PORT --dealer HOST:PORT --key moving.key \\
        --peer fixed.pub --dealer-key dealer.pub -o OUTDIR [--transform --sampling --fraction --levels ...]
    ppreg party --role fixed --image J.nii.gz --connect HOST:PORT --dealer HOST:PORT --key fixed.key \\
        --peer moving.pub --dealer-key dealer.pub [--policy FILE] [--report FILE]

``--secure ckks`` (moving party: the packed CKKS protocol, ssd with a linear transform, or points;
with ``--transform bspline`` the CKKS B-spline term, party2's own key pair; with ``--ckks-variant v1|v2``
the paper's protocols, ssd with a linear transform, which the fixed party runs only if its policy lists
them in ``ckks_variants``; the dealer process still runs: it binds the session), ``--transform flash``
(FLASH under MPC) and
``--points FILE`` (both parties, instead of ``--image``: paired ``(n, d)`` points, CSV or ``.npy``;
the moving party adds ``--extent``) run over the same three processes; the fixed party and the
dealer need no option for them (their policy decides).

The moving party writes OUTDIR as ``ppreg register`` does (staged, then moved in); each process
writes its own report with ``--report`` (own compute, bytes, time per operation; the fixed party and
the dealer: their policy and what they revealed). The fixed party and the dealer refuse what their
``--policy`` (JSON, or TOML for ``*.toml``: :mod:`ppreg.secure.policy`; default
:data:`~ppreg.secure.policy.DEFAULT`) does not allow. Exit status: 0 on success,
2 for bad input (one ``ppreg: error: ...`` line, e.g. a bad policy file), 1 when the session fails
(a peer stalls, dies, is refused, refuses by its policy or sends a malformed or oversized message:
one ``ppreg: error: ROLE: ...`` line; nothing is written).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._atomic import atomic_write_text, publish_folder, staged_folder
from .options import SECURE_SSD_TRANSFORMS, SVF_FINEST_ITERATIONS
from .result import Result
from .sampling import METHODS

ROLES = {"moving": "party1", "fixed": "party2", "dealer": "dealer"}


def _session_errors() -> tuple:
    """What ends a session without a result: a malformed or refused message, a timeout, a lost peer."""
    import zmq

    from .secure.net.channel import ProtocolError

    return ProtocolError, TimeoutError, ConnectionError, zmq.ZMQError


class SessionError(Exception):
    """The secure session failed at run time (exit status 1)."""


def add_parsers(sub, *, levels_type, fraction_type, iterations_type) -> None:
    """Register ``keygen`` and ``party`` on the ``ppreg`` subparsers."""
    kg = sub.add_parser("keygen", help="write a CURVE key pair NAME.key (secret, mode 0600) and NAME.pub")
    kg.add_argument("name", type=Path, help="path prefix of the two files")
    kg.add_argument("--force", action="store_true", help="overwrite existing files")
    p = sub.add_parser("party", help="run one role of a secure registration (dealer, moving or fixed party)")
    p.add_argument("--role", choices=tuple(ROLES), required=True)
    p.add_argument("--key", type=Path, required=True, help="this process's secret key file (NAME.key)")
    p.add_argument("--image", type=Path, help="moving/fixed: this party's image (NIfTI)")
    p.add_argument("--points", type=Path,
                   help="moving/fixed, instead of --image: this party's paired points, an (n, d) array (d = 2 or 3; "
                        "row i of both files is the same landmark) as CSV (n lines of d numbers) or .npy")
    p.add_argument("--extent", type=float, default=None,
                   help="moving, with --points: public bound on |x - centroid| per coordinate of either set "
                        "(e.g. the largest image side)")
    p.add_argument("--secure", choices=("mpc", "ckks"), default="mpc",
                   help="moving: mpc (secret sharing with the dealer, default) or ckks (packed CKKS: ssd with a "
                        "linear transform or bspline, or --points; needs ppreg[fhe] in the moving and fixed processes)")
    p.add_argument("--ckks-variant", choices=("packed", "v1", "v2"), default="packed",
                   help="moving, --secure ckks: packed (default; party2 holds no key), or the paper's v1/v2 (ssd, "
                        "linear transforms; party2 decrypts what party1 sends, so it runs them only if its --policy "
                        "lists them in ckks_variants: safe against a semi-honest moving party only; v1 sends a "
                        "~34 MB key and is slow, ~128 rotations per 128 voxels per iteration)")
    p.add_argument("--listen", help="dealer, moving: HOST:PORT to listen on")
    p.add_argument("--connect", help="fixed: HOST:PORT of the moving party")
    p.add_argument("--dealer", help="moving, fixed: HOST:PORT of the dealer")
    p.add_argument("--peer", type=Path, help="moving, fixed: the other party's public key (NAME.pub)")
    p.add_argument("--dealer-key", type=Path, help="moving, fixed: the dealer's public key")
    p.add_argument("--peers", type=Path, nargs=2, metavar=("MOVING.pub", "FIXED.pub"),
                   help="dealer: the moving and the fixed party's public keys")
    p.add_argument("-o", "--output", type=Path, help="moving: output directory (as ppreg register)")
    p.add_argument("--report", type=Path, help="write this process's own report (JSON: time, bytes, per operation)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for a peer to connect and for each message (default 120)")
    p.add_argument("--max-message-mb", type=float, default=None,
                   help="largest message sent or accepted, MiB (default 1024; frames received are also bounded by "
                        "the protocol, from the fixed image's size)")
    p.add_argument("--policy", type=Path, default=None,
                   help="fixed, dealer: what this process agrees to compute (JSON, or TOML for *.toml; default: the "
                        "built-in policy, see the README)")
    p.add_argument("--transform", choices=SECURE_SSD_TRANSFORMS + ("svf", "flash"), default="rigid",
                   help="svf: with --loss lncc; flash: ssd, --levels 1")
    p.add_argument("--band-size", type=int, default=None, help="flash: odd Fourier band size per axis (default 15)")
    p.add_argument("--alpha", type=float, default=None, help="flash: smoothness weight of L (default 100)")
    p.add_argument("--sigma", type=float, default=None, help="flash: noise sigma, fraction of max intensity (0.03)")
    p.add_argument("--optimizer", choices=("lbfgs", "flash"), default=None,
                   help="flash: lbfgs (default) or flash (FLASH's step-controlled gradient descent)")
    p.add_argument("--spacing", type=int, default=4, help="bspline: finest control spacing in voxels (default 4)")
    p.add_argument("--regularization", type=float, default=0.01, help="bspline: bending-energy weight")
    p.add_argument("--loss", choices=("ssd", "mi", "lncc"), default="ssd",
                   help="ssd (Gauss-Newton), mi (Mattes mutual information, linear transforms) or lncc (ANTs local "
                        "CC, --transform svf) under MPC")
    p.add_argument("--bins", type=int, default=32, help="mi: histogram bins (default 32)")
    p.add_argument("--sampling", choices=METHODS, default=None, help="voxel sampling per iteration (default: all)")
    p.add_argument("--fraction", type=fraction_type, default=0.1, help="sampled fraction of voxels (default 0.1)")
    p.add_argument("--symmetric", action="store_true",
                   help="svf with lncc: SyN's two half velocities; the fixed party learns its own half and force")
    p.add_argument("--lncc-open", choices=("smoothed", "force"), default="smoothed",
                   help="svf with lncc: what each iteration opens: the force smoothed on the shares (default) or the "
                        "raw per-voxel force (a fixed party's policy may require smoothed)")
    p.add_argument("--audit", type=Path, default=None,
                   help="write this process's audit log (JSON lines: every quantity opened to it, its shape and the "
                        "running count; see ppreg.secure.audit); its totals go into --report and report.json")
    p.add_argument("--levels", type=levels_type, default=(4, 2, 1), help="pyramid shrink factors (default 4,2,1)")
    p.add_argument("--max-iterations", type=iterations_type, default=None,
                   help=f"per level, or one count per level for svf (default 100; bspline 15; svf 60, "
                        f"{SVF_FINEST_ITERATIONS['lncc']} at the finest)")
    p.add_argument("--seed", type=int, default=0, help="public sampling seed (default 0)")
    p.add_argument("--frac-bits", type=int, default=16, help="fixed-point fractional bits")


def run_keygen(args, error) -> int:
    from .secure.net import keys  # the secure stack loads in the party commands only, not at every start

    try:
        secret, public = keys.write_keypair(args.name, overwrite=args.force)
    except (FileExistsError, FileNotFoundError, RuntimeError) as exc:
        raise error(str(exc)) from None
    print(f"wrote {secret} (secret, mode 0600: keep it) and {public} (give it to the peers)")
    return 0


def _need(args, error, *names):
    missing = [n for n in names if getattr(args, n.replace("-", "_")) is None]
    if missing:
        raise error(f"--role {args.role} needs " + ", ".join(f"--{n}" for n in missing))


def _keys(args, error, *public_args):
    from .secure.net import keys

    try:
        own = keys.load_keypair(args.key)
        return own, [keys.load_public(p) for p in public_args]
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        raise error(str(exc)) from None


def run_party(args, error, load_image, write_outputs) -> int:
    """``ppreg party``: validate, run the role, write its outputs; errors as described in the module docstring."""
    max_mb = 1024.0 if args.max_message_mb is None else args.max_message_mb
    # finite too: "nan" and "inf" parse as floats, and every receive needs a deadline
    if not (0 < args.timeout < math.inf and 0 < max_mb < math.inf):
        raise error("--timeout and --max-message-mb must be positive and finite")
    limits = dict(timeout=args.timeout, max_message_bytes=int(max_mb * 2**20))
    policy = _policy(args, error)
    log = _audit(args, error)
    try:
        return _run_role(args, error, load_image, write_outputs, policy, log, limits)
    finally:
        if log is not None:
            log.close()


def _audit(args, error):
    """The ``--audit`` log, opened (created) now, before any connection; ``None`` without the option."""
    if args.audit is None:
        return None
    from .secure.audit import AuditLog

    try:
        return AuditLog(args.audit)
    except ValueError as exc:
        raise error(f"{args.role}: {exc}") from None


def _run_role(args, error, load_image, write_outputs, policy, log, limits) -> int:
    from .secure import parties

    role = args.role
    try:
        if role == "dealer":
            _need(args, error, "listen", "peers")
            own, (moving_key, fixed_key) = _keys(args, error, *args.peers)
            report = parties.run_dealer(own, listen=args.listen, moving_key=moving_key, fixed_key=fixed_key,
                                        policy=policy, audit=log, **limits)
        elif role == "fixed":
            _need(args, error, "connect", "dealer", "peer", "dealer-key")
            own, (peer, dealer) = _keys(args, error, args.peer, args.dealer_key)
            data = _own_data(args, error, load_image)
            report = parties.run_fixed(data, own, connect=args.connect, dealer=args.dealer, peer_key=peer,
                                       dealer_key=dealer, policy=policy, audit=log, **limits)
        else:
            _need(args, error, "listen", "dealer", "peer", "dealer-key", "output")
            own, (peer, dealer) = _keys(args, error, args.peer, args.dealer_key)
            data = _own_data(args, error, load_image)
            options = _moving_options(args, error)
            try:
                result, affine, report = parties.run_moving(
                    data, own, listen=args.listen, dealer=args.dealer, peer_key=peer, dealer_key=dealer, audit=log,
                    **limits, secure=args.secure, **options,
                    on_connect=lambda: print("moving: connected to the fixed party and the dealer", file=sys.stderr,
                                             flush=True))
            except ArithmeticError as exc:  # OverflowError, FloatingPointError, lncc's TruncationFailure
                raise SessionError(f"moving: {exc}") from None
            if log is not None and hasattr(result, "audit"):  # report.json gets the totals party1 received
                result = result.replace(audit=report["audit"])
            if args.points is not None:
                _write_points(args.output, result)
            else:
                write_outputs(args.output, result, affine)
            if args.report is not None:
                atomic_write_text(args.report, json.dumps(dict(report, role=role), indent=2) + "\n")
            _print_moving(result, report["wall_s"], args.output, args.secure)
            return 0
    except _session_errors() as exc:
        raise SessionError(str(exc) if str(exc).startswith(ROLES[role]) else f"{ROLES[role]}: {exc}") from None
    except (ValueError, ImportError) as exc:  # bad addresses, images or options; --secure ckks without TenSEAL
        raise error(f"{role}: {exc}") from None
    if args.report is not None:
        atomic_write_text(args.report, json.dumps(dict(report, role=role), indent=2) + "\n")
    print(f"{role}: done in {report['wall_s']:.2f} s; compute {report['time_s']:.3f} s; sent {report['online']} bytes "
          f"online, received {report['offline']} bytes offline")
    return 0


def _policy(args, error):
    """The ``--policy`` file (fixed party and dealer only), or ``None`` for the default."""
    if args.policy is None:
        return None
    if args.role == "moving":
        raise error("--policy is for the fixed party and the dealer (the moving party leads)")
    from .secure import parties  # noqa: F401 - registers every protocol's operations (names a policy may list)
    from .secure.policy import load_policy

    try:
        return load_policy(args.policy)
    except (FileNotFoundError, ValueError) as exc:
        raise error(f"{args.role}: {exc}") from None


def load_points(path: Path):
    """A point file as float64 ``(n, d)``: ``.npy`` (``numpy.load``, no pickles) or text/CSV (``numpy.loadtxt``,
    comma or whitespace separated, ``#`` comments).

    Raises:
        FileNotFoundError: unreadable. ValueError: not numbers, or not ``(n, d)`` with d in {2, 3} and n >= d.
    """
    import numpy as np

    from .secure.protocols.points import check_points

    try:
        if path.suffix.lower() == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            text = path.read_text()
            data = np.loadtxt(text.splitlines(), delimiter="," if "," in text else None, ndmin=2)
    except OSError as exc:
        raise FileNotFoundError(f"cannot read point file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"point file {path}: {exc}") from None
    return check_points(data, f"point file {path}")


def _own_data(args, error, load_image):
    """This party's image (``--image``) or points (``--points``): exactly one of them."""
    if (args.image is None) == (args.points is None):
        raise error(f"--role {args.role} needs --image or --points (one of them)")
    if args.image is not None:
        return load_image(args.image)
    try:
        return load_points(args.points)
    except (FileNotFoundError, ValueError) as exc:
        raise error(f"{args.role}: {exc}") from None


def _moving_options(args, error) -> dict:
    """The moving party's registration options from the command line (``ckks_variant`` unless packed:
    :func:`ppreg.secure.parties.check_scheme` refuses it outside ``--secure ckks`` ssd with a linear transform)."""
    options = _scheme_options(args, error)
    if args.ckks_variant != "packed":
        options["ckks_variant"] = args.ckks_variant
    return options


def _scheme_options(args, error) -> dict:
    if args.points is not None:
        if args.extent is None:
            raise error("moving: --points needs --extent (the public bound on the points' spread)")
        return dict(loss="points", extent=args.extent, frac_bits=args.frac_bits)
    if args.transform == "flash":
        if args.loss != "ssd" or args.sampling is not None:
            raise error("moving: --transform flash runs --loss ssd on every voxel (no --sampling)")
        flash = {k: v for k, v in (("band_size", args.band_size), ("alpha", args.alpha), ("sigma", args.sigma),
                                   ("optimizer", args.optimizer)) if v is not None}
        return dict(transform="flash", levels=args.levels, max_iterations=args.max_iterations,
                    frac_bits=args.frac_bits, **flash)
    return dict(transform=args.transform, levels=args.levels, max_iterations=args.max_iterations,
                frac_bits=args.frac_bits, loss=args.loss, **_sampling_options(args, error),
                **(dict(spacing=args.spacing, regularization=args.regularization)
                   if args.transform == "bspline" else {}),
                **(dict(bins=args.bins) if args.loss == "mi" else {}))


def _write_points(outdir: Path, result) -> None:
    """A point-cloud registration's ``transform.json`` and ``report.json`` in ``outdir`` (staged, then
    moved in; an earlier image registration's files there, listed by its ``report.json``, are removed)."""
    names = ["report.json", "transform.json"]
    with staged_folder(outdir) as stage:
        atomic_write_text(stage / "transform.json", json.dumps(result.transform_json(), indent=2) + "\n")
        atomic_write_text(stage / "report.json", json.dumps({**result.report_json(), "files": names}, indent=2) + "\n")
        publish_folder(stage, outdir, names)


def _sampling_options(args, error) -> dict:
    """``sampling``, ``fraction`` and ``key`` for the losses that sample voxels; lncc uses every voxel
    and takes ``--symmetric``."""
    if args.loss != "lncc":
        if args.symmetric or args.lncc_open != "smoothed":
            raise error("moving: --symmetric and --lncc-open go with --transform svf --loss lncc")
        return dict(sampling=args.sampling, fraction=args.fraction, key=args.seed)
    if args.sampling is not None:
        raise error("moving: --loss lncc uses every voxel (no --sampling)")
    return dict(symmetric=args.symmetric, lncc_open=args.lncc_open)


def _print_moving(result: Result, wall: float, outdir: Path, secure: str = "mpc") -> None:
    b = result.bytes
    points = not hasattr(result, "iterations")  # a point-cloud registration (parties.PointsResult)
    what = "rigid point-cloud" if points else result.transform
    steps = "" if points else f" {result.iterations} iterations, final mean squared error {result.final_loss:.4f},"
    print(f"moving: {what} registration ({secure}, 3 processes):{steps} {wall:.2f} s; online bytes sent: party1 "
          f"{b['party1']['online']}, party2 {b['party2']['online']}; wrote {outdir}")


# --- ppreg demo --processes ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def party_commands(workdir: Path, fixed: Path, moving: Path, outdir: Path, options: list[str], *,
                   timeout: float = 120.0, policy: Path | None = None) -> dict[str, list[str]]:
    """Key pairs in ``workdir`` and the three ``ppreg party`` command lines on free loopback ports
    (``policy``: the ``--policy`` file of the fixed party and the dealer; ``None``: their default)."""
    from .secure.net import keys

    for name in ROLES:
        if not (workdir / f"{name}.key").exists():
            keys.write_keypair(workdir / name)
    dealer, moving_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    base = [sys.executable, "-m", "ppreg.cli", "party", "--timeout", str(timeout)]
    k = {name: str(workdir / f"{name}.key") for name in ROLES}
    pub = {name: str(workdir / f"{name}.pub") for name in ROLES}
    follower = [] if policy is None else ["--policy", str(policy)]
    return {
        "dealer": base + ["--role", "dealer", "--listen", dealer, "--key", k["dealer"], "--peers", pub["moving"],
                          pub["fixed"], "--report", str(workdir / "dealer_report.json")] + follower,
        "fixed": base + ["--role", "fixed", "--image", str(fixed), "--connect", moving_at, "--dealer", dealer,
                         "--key", k["fixed"], "--peer", pub["moving"], "--dealer-key", pub["dealer"],
                         "--report", str(workdir / "fixed_report.json")] + follower,
        "moving": base + ["--role", "moving", "--image", str(moving), "--listen", moving_at, "--dealer", dealer,
                          "--key", k["moving"], "--peer", pub["fixed"], "--dealer-key", pub["dealer"],
                          "-o", str(outdir), "--report", str(workdir / "moving_report.json")] + options,
    }


def start_processes(commands: dict[str, list[str]]) -> dict[str, subprocess.Popen]:
    """Start the ``ppreg party`` processes (stdout and stderr captured as text)."""
    return {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, cmd in commands.items()}


def wait_processes(procs: dict[str, subprocess.Popen], *, timeout: float) -> dict[str, subprocess.CompletedProcess]:
    """Wait for every process (killing all that remain after ``timeout`` s in all); their outcomes.

    Raises:
        subprocess.TimeoutExpired: a process outlived ``timeout`` (all are killed first).
    """
    out, deadline = {}, time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def run_processes(commands: dict[str, list[str]], *, timeout: float) -> dict[str, subprocess.CompletedProcess]:
    """Start the three processes, wait for all (killing them after ``timeout`` s); their outcomes."""
    return wait_processes(start_processes(commands), timeout=timeout)


def _option_args(options: dict) -> list[str]:
    args = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        else:
            args += [flag, ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]
    return args


def load_result(outdir: Path) -> Result:
    """A :class:`~ppreg.register.Result` (linear, bspline or svf) from the files ``ppreg register`` wrote."""
    import numpy as np

    from .image import load, load_field
    from .result import LevelReport

    rep = json.loads((outdir / "report.json").read_text())
    doc = json.loads((outdir / "transform.json").read_text())
    levels = tuple(LevelReport(lv["factor"], tuple(lv["shape"]), lv["iterations"], lv["n_samples"],
                               np.full(lv["iterations"], np.nan)) for lv in rep["levels"])
    if doc["type"] == "bspline":
        params, matrix, center = np.asarray(doc["coefficients"], np.float32), None, None
    elif doc["type"] == "svf":
        params = np.asarray(load_field(outdir / doc["velocity"])[0], np.float32)
        if "fixed_velocity" in doc:  # two-party symmetric: both halves
            params = np.stack([params, np.asarray(load_field(outdir / doc["fixed_velocity"])[0], np.float32)])
        matrix, center = None, None
    else:
        params, matrix, center = np.asarray(doc["parameters"]), np.asarray(doc["matrix"]), np.asarray(doc["center"])
    return Result(transform=doc["type"], params=params, matrix=matrix, center=center, spacing=doc.get("spacing"),
                  warped=load(outdir / "warped.nii.gz").data, final_loss=rep["final_loss"],
                  iterations=rep["iterations"], levels=levels, secure=rep["secure"], time_s=rep["time_s"],
                  bytes=rep["bytes"], bytes_per_iteration=rep["bytes_per_iteration"])


def register_processes(fixed, moving, *, secure: str = "mpc", timeout: float = 600.0, reports: dict | None = None,
                       policy: dict | None = None, **options) -> Result:
    """One secure registration as three local ``ppreg party`` processes on the loopback interface.

    Args:
        fixed, moving: :class:`~ppreg.image.Image` (written to a private temporary directory).
        secure: ``"mpc"`` or ``"ckks"`` (``--secure ckks``: packed, linear transforms).
        timeout: seconds before the processes are killed.
        reports: if a dict, filled with each process's own report (``"moving"``, ``"fixed"``,
            ``"dealer"``: ``{"time_s", "wall_s", "online", "offline", "ops"}``).
        policy: the fixed party's and the dealer's policy (keys of :mod:`ppreg.secure.policy`,
            written to a JSON ``--policy`` file); ``None``: their default.
        options: ``transform``, ``loss``, ``sampling``, ``fraction``, ``levels``, ``max_iterations``,
            ``seed``, ``frac_bits``, ``spacing``, ``regularization``, ``bins`` (as ``ppreg party``).

    Returns:
        the moving party's result (times and bytes as each process measured them).

    Raises:
        ValueError: ``secure`` is not ``"mpc"`` or ``"ckks"``. RuntimeError: a process failed (the error lines are in
            the message).
    """
    from .image import save

    if secure not in ("mpc", "ckks"):
        raise ValueError(f"three-process registration is secure (mpc or ckks), got secure={secure!r}")
    if secure == "ckks":
        options = dict(options, secure="ckks")
    with tempfile.TemporaryDirectory(prefix="ppreg-parties-") as tmp:
        work = Path(tmp)
        save(fixed, work / "fixed.nii.gz")
        save(moving, work / "moving.nii.gz")
        if policy is not None:
            (work / "policy.json").write_text(json.dumps(policy))
        commands = party_commands(work, work / "fixed.nii.gz", work / "moving.nii.gz", work / "out",
                                  _option_args(options), timeout=min(timeout, 120.0),
                                  policy=None if policy is None else work / "policy.json")
        done = run_processes(commands, timeout=timeout)
        failed = {n: p.stderr.strip().splitlines()[-1:] for n, p in done.items() if p.returncode != 0}
        if failed:
            raise RuntimeError(f"secure registration over 3 processes failed: {failed}")
        if reports is not None:
            reports.update({name: json.loads((work / f"{name}_report.json").read_text()) for name in ROLES})
        return load_result(work / "out")
