"""What the fixed party (party2) and the dealer agree to compute: a policy, checked before every operation.

Party1 leads a secure registration: it announces each operation (:mod:`ppreg.secure.roles`) and
the followers run it. Without a policy party2 would run whatever party1 announces (any loss,
transform, iteration count, sample count, sampling method, fixed-point precision), and a
deviating party1 can choose these to learn more about party2's image (e.g. a handful of samples,
or thousands of iterations). Each follower therefore checks every command against its own
:class:`Policy` (:class:`Guard`) before it runs it, and refuses anything outside it with a
:class:`PolicyError` naming the rule.

The policy file (``ppreg party --role fixed|dealer --policy FILE``) is JSON, or TOML when its
name ends in ``.toml``; every key is optional (a key left out keeps its default, :data:`DEFAULT`),
and an unknown key or a value of the wrong type is an error naming the key. Each key is a rule;
a refusal names it:

- ``losses`` (default ``["ssd", "mi", "lncc", "points"]``): loss families party1 may run.
- ``transforms`` (``["translation", "rigid", "affine", "bspline", "svf", "flash"]``; point clouds
  count as ``rigid``): transforms party1 may run.
- ``operations`` (``null``: every protocol operation): protocol operations allowed by name
  (``mask``, ``query``, ``ssd``, ``spline_level``, ``spline_query``, ``mi_level``, ``mi_joint``,
  ``mi_grad``, ``lcc_level``, ``lcc_round``, ``lcc_halves``, ``points``; FLASH: ``flash_level``,
  ``flash_eval``; CKKS: ``ckks_setup``, ``ckks_key``, ``ckks_level``, ``ckks_query``, ``ckks_ssd``,
  ``ckks_points``, ``ckks_sample``, ``ckks_spline_setup``, ``ckks_spline_level``, ``ckks_spline_sample``,
  ``ckks_spline_query``, :mod:`ppreg.secure.ckks.remote`).
- ``max_iterations`` (200): iteration attempts per level (lncc retries count); it also bounds the
  encrypted samples of its image party2 sends on a level (CKKS URS / v2: ``max_iterations + 2``).
- ``max_levels`` (8): levels (masked images of party2) per session.
- ``max_revealed`` (``null``, no limit; TOML: leave it out or ``inf``): numbers revealed to party1
  in the whole session.
- ``max_revealed_per_voxel`` (256): the same, per voxel of party2's image.
- ``min_samples`` (16): voxels (points) combined by one query; more than the 12 parameters of a
  3D affine transform, so that no single query determines the values it samples.
- ``gms`` (``true``): gradient-magnitude sampling (its indices are a function of party1's image).
- ``symmetric`` (``true``): symmetric lncc, in which party2 reveals its half velocity.
- ``lncc_open`` (``"smoothed"``): what an lncc iteration may open to party1: ``"smoothed"`` only
  the force smoothed on the shares (:mod:`ppreg.secure.protocols.lcc`), ``"force"`` also the raw
  per-voxel force (``ppreg party --lncc-open force``).
- ``min_fluid_sigma`` (1.0): the smallest smoothing sigma (level voxels) a smoothed lncc level
  may use (a tiny sigma would open the raw force under another name).
- ``frac_bits`` (``[8, 24]``): fixed-point fractional bits (the session's and lncc's).
- ``max_bins`` (64): Mattes MI histogram bins (``bins^2`` revealed per iteration).
- ``max_final_errors`` (1): final errors (``ssd``) per session; each is a linear functional of
  party2's image with coefficients party1 chooses.
- ``max_voxels`` (``2**25``): voxels of a level; party2 uses its own image's count instead, and
  the dealer also bounds its frames by it.
- ``max_spline_functionals_per_voxel`` (0: party2 does not run the B-spline protocol; ``null`` or
  ``inf``: no limit): linear functionals of party2's image revealed by the B-spline protocol in the
  session (``R = B^T (a ⊙ J)``: ``d P`` per query, every level and iteration counted), per voxel of
  party2's image; party2 refuses a level when not one more query fits, and a query past the limit.
  Party2 cannot compute the functionals (their weights ``a`` are party1's), so it counts them: the
  count bounds their rank. No positive default is safe: with a smoothness prior, three queries at
  control spacing 16 (0.09 per voxel) rebuild J's contrast to relative L2 error 0.35, one at spacing
  4 (0.2) to 0.36, a registration at the CLI defaults (up to 2.8 per voxel on a 257 x 221 slice,
  1.0 in 3D) to 0.03 (:mod:`ppreg.secure.protocols.bspline`, DESIGN.md). A hospital that accepts
  this sets the key (e.g. 3 for the CLI defaults in 2D).
- ``spline_noise`` (0; at most ``2**-6``): the standard deviation of the Gaussian noise party2 adds
  to its share of every B-spline ``R`` (and to its reply in the CKKS protocol), relative to the
  largest ``|R|`` party1's encoding admits (ring units ``2^61``). Accuracy cost and the
  reconstruction error it buys: :mod:`ppreg.secure.protocols.bspline`.
- ``ckks_variants`` (``["packed"]``): the CKKS protocols party2 runs (``ckks_setup``'s variant;
  :mod:`ppreg.secure.ckks.remote`). ``packed`` gives party2 no key, so a deviating party1 learns
  only the numbers counted here. In the paper's ``v1`` and ``v2`` (:mod:`ppreg.secure.ckks.paper`)
  party2 decrypts what party1 sends: a deviating party1 that crafts its ciphertext reads linear
  functionals of party2's fresh key from the reply (the key-recovery attack of finding 2, bounded
  but not prevented by the per-query count, level and size checks and the query cap), and with the
  key decrypts ``J`` (v1 sends it encrypted). In ``v2`` it needs no key: party1's ``S_2`` is
  encrypted under its own key, so party2 cannot bound it, and with entries of ``2^57`` instead of
  at most 1 party1 reads ``J_2`` (half of the level or sample) to about 10 bits per voxel above
  party2's mask from one query, while this policy counts ``P`` numbers. Safe only against a
  semi-honest party1: opt in with ``["packed", "v1", "v2"]``.

"Revealed numbers" are the outputs party1 decodes, per operation: ``P`` parameters per
Gauss-Newton query, ``d`` per control point per B-spline query, ``bins^2 + P`` per MI iteration,
``d`` per voxel (plus the loss) per lncc iteration, ``d`` per voxel for the symmetric half
velocity, ``d^2 + d`` for point clouds, ``2 T^d d + 1`` per FLASH energy evaluation (band ``T``,
each counted as an iteration), one per final error; under packed CKKS (:mod:`ppreg.secure.ckks.remote`)
``P`` and ``d^2`` round up to even and the final error counts two (v1, v2: ``P`` and one). The default admits every
documented command (``ppreg demo --processes``, ``ppreg party`` with the defaults of each loss,
which reach 150 revealed numbers per voxel with lncc in 3D) except the B-spline protocol, which
party2 refuses naming ``max_spline_functionals_per_voxel`` (what it reveals rebuilds the image;
see there); a hospital narrows the policy, or raises that key to run B-spline registrations.

Independent of the policy, each follower refuses (:class:`~ppreg.secure.net.channel.ProtocolError`) a
command that is malformed (a missing field, a wrong type, a value out of its range), that comes
before ``setup`` or repeats it, that names a level it did not open, that is a second point-cloud
product (``points``, ``ckks_points``: with ``ceil(n / d)`` of them party1 solves for party2's points), or
that reuses a label: party2 keeps its own record of every label, so a deviating party1 cannot make it
mask twice with one stream (the dealer's own refusal is not enough: party1 can leave the dealer out of
an operation).

The policy also sets the frame limits (:func:`frame_limit`): the largest frame party2 accepts is
derived from its own image size and the protocols the policy allows, instead of a fixed 1 GiB.
"""

from __future__ import annotations

import json
import math
import numbers
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .net.channel import MAX_HEADER_BYTES, ProtocolError
from .mpc.ring import FRAC_BITS_RANGE

LOSSES = ("ssd", "mi", "lncc", "points")
TRANSFORMS = ("translation", "rigid", "affine", "bspline", "svf", "flash")
MAX_COMMAND_BYTES = 1 << 16
FRAMEWORK = ("setup", "describe", "end")  # always allowed: the session itself
OPERATIONS = {  # protocol operation -> loss family (None: the final error, under any loss)
    "mask": "ssd", "query": "ssd", "ssd": None, "spline_level": "ssd", "spline_query": "ssd",
    "mi_level": "mi", "mi_joint": "mi", "mi_grad": "mi",
    "lcc_level": "lncc", "lcc_round": "lncc", "lcc_halves": "lncc",
    "points": "points",
}
CKKS_VARIANTS = ("packed", "v1", "v2")  # ckks_variants: ppreg.secure.ckks (packed) and its paper variants
MAX_SPLINE_NOISE = 2.0**-6  # spline_noise: noise * 2^61 * 9 sigma stays inside the signed ring
CHECKS: dict[str, object] = {}  # checks of operations registered by other modules (register_operation)
FRAME_BOUNDS: list = []  # frame bounds of protocols registered by other modules (register_frame_bound)
_LABEL_CHARS = 200


def register_operation(op: str, loss: str | None, check) -> None:
    """Make a new protocol operation acceptable to the followers: ``loss`` is its family (one of
    :data:`LOSSES`, ``None`` for any), ``check(guard, cmd)`` validates the command with the
    :class:`Guard`'s helpers (``new_label``, ``field``, ``count``, ``level_of``, ``open_level``,
    ``iteration``, ``reveal``, ``require_loss``, ``require_transform``, ``check_samples``, ...)
    and counts what it reveals to party1. A follower refuses an operation without a check."""
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or None, got {loss!r}")
    OPERATIONS[op] = loss
    CHECKS[op] = check


def register_frame_bound(bound) -> None:
    """Add a protocol's largest frame to :func:`frame_limit`: ``bound(voxels, ndim, policy)`` returns
    the bytes (header included) of its largest frame over a grid of ``voxels`` voxels (points) of
    ``ndim`` axes, or 0 when ``policy`` allows none of its operations."""
    FRAME_BOUNDS.append(bound)


def allows_any(policy: Policy | None, ops) -> bool:
    """Whether ``policy`` (default :data:`DEFAULT`) allows any of the operations ``ops`` by name."""
    policy = DEFAULT if policy is None else policy
    return policy.operations is None or any(op in policy.operations for op in ops)


class PolicyError(ProtocolError):
    """A command outside the follower's policy; ``rule`` names the policy key."""

    def __init__(self, role: str, rule: str, detail: str):
        super().__init__(f"{role}: refused by policy rule '{rule}': {detail}")
        self.rule = rule


@dataclass(frozen=True)
class Policy:
    """A follower's limits (see the module docstring for each key)."""

    losses: tuple[str, ...] = LOSSES
    transforms: tuple[str, ...] = TRANSFORMS
    operations: tuple[str, ...] | None = None
    max_iterations: int = 200
    max_levels: int = 8
    max_revealed: int | None = None
    max_revealed_per_voxel: float | None = 256.0
    min_samples: int = 16
    gms: bool = True
    symmetric: bool = True
    lncc_open: str = "smoothed"
    min_fluid_sigma: float = 1.0
    frac_bits: tuple[int, int] = FRAC_BITS_RANGE
    max_bins: int = 64
    max_final_errors: int = 1
    max_voxels: int = 2**25
    max_spline_functionals_per_voxel: float | None = 0.0
    spline_noise: float = 0.0
    ckks_variants: tuple[str, ...] = ("packed",)

    @classmethod
    def from_mapping(cls, doc: dict, source: str = "policy") -> Policy:
        """A policy from a parsed file: the defaults, with the keys ``doc`` sets.

        Raises:
            ValueError: an unknown key or a value of the wrong type or range (naming the key).
        """
        if not isinstance(doc, dict):
            raise ValueError(f"{source}: a policy is a table of keys, got {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"{source}: unknown policy key(s) {unknown}; known: {sorted(known)}")
        values = {}
        for key, value in doc.items():
            values[key] = _parse_value(key, value, f"{source}: {key!r}")
        return replace(DEFAULT, **values)

    def to_dict(self) -> dict:
        """JSON-ready (``null`` for no limit)."""
        out = asdict(self)
        for key in ("losses", "transforms", "operations", "frac_bits", "ckks_variants"):
            out[key] = None if out[key] is None else list(out[key])
        return out


DEFAULT = Policy()
"""The default policy: every documented command runs under it (module docstring)."""


def _parse_value(key, value, where):
    def integer(lo):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{where} must be an integer >= {lo}, got {value!r}")
        return int(value)

    def names(allowed):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where} must be a list of names from {list(allowed)}, got {value!r}")
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"{where}: unknown {bad}; expected names from {list(allowed)}")
        return tuple(dict.fromkeys(value))

    if key == "losses":
        return names(LOSSES)
    if key == "transforms":
        return names(TRANSFORMS)
    if key == "operations":
        return None if value is None else names(tuple(OPERATIONS))
    if key == "ckks_variants":
        return names(CKKS_VARIANTS)
    if key == "lncc_open":
        if value not in ("smoothed", "force"):
            raise ValueError(f"{where} must be \"smoothed\" or \"force\", got {value!r}")
        return value
    if key == "min_fluid_sigma":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where} must be a non-negative number of voxels, got {value!r}")
        return float(value)
    if key in ("gms", "symmetric"):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if key == "frac_bits":
        lo, hi = FRAC_BITS_RANGE
        if (not isinstance(value, list) or len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                   for v in value)
                or not lo <= value[0] <= value[1] <= hi):
            raise ValueError(f"{where} must be [low, high] integers with {lo} <= low <= high <= {hi}, got {value!r}")
        return (int(value[0]), int(value[1]))
    if key == "spline_noise":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SPLINE_NOISE:
            raise ValueError(f"{where} must be a number in [0, {MAX_SPLINE_NOISE}], got {value!r}")
        return float(value)
    if key in ("max_revealed", "max_revealed_per_voxel", "max_spline_functionals_per_voxel"):
        if value is None or (isinstance(value, float) and value == math.inf):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where} must be a non-negative number (null or inf: no limit), got {value!r}")
        return int(value) if key == "max_revealed" else float(value)
    if key == "max_bins":
        return integer(2)
    if key == "max_final_errors":
        return integer(0)
    return integer(1)  # max_iterations, max_levels, min_samples, max_voxels


def load_policy(path: str | Path) -> Policy:
    """Read a policy file: TOML when the name ends in ``.toml``, JSON otherwise.

    Raises:
        FileNotFoundError: missing or unreadable file. ValueError: not valid JSON/TOML, or a bad key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            doc = tomllib.loads(data.decode("utf-8"))
        else:
            doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"policy file {path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: "
                         f"{exc}") from None
    return Policy.from_mapping(doc, str(path))


def check_spline_functionals(role: str, policy: Policy | None, total: int, voxels: int, what: str) -> None:
    """Refuse (:class:`PolicyError`, rule ``max_spline_functionals_per_voxel``) when ``total`` B-spline
    functionals of party2's image (``d P`` per query, counted by party2 itself) exceed the policy's
    limit per voxel of its ``voxels``-voxel image; ``policy`` ``None``: no limit."""
    limit = None if policy is None else policy.max_spline_functionals_per_voxel
    if limit is not None and total > limit * max(int(voxels), 1):
        raise PolicyError(role, "max_spline_functionals_per_voxel",
                          f"{what} would bring the linear functionals of party2's image revealed by the B-spline "
                          f"protocol to {total} ({total / max(int(voxels), 1):.3g} per voxel of {voxels}); the "
                          f"policy allows {limit:g} per voxel (with more, party1 can rebuild the image by least "
                          "squares)")


# --- frame limits derived from the protocol ---------------------------------------------------------


def per_voxel_elements(ndim: int, policy: Policy | None = None) -> int:
    """Ring elements per fixed-grid voxel in the largest frame of any protocol ``policy`` allows:
    lncc's stacked rounds (up to 4 factors, or ``d`` gradient components), a query's ``d`` factors,
    and with MI its one-hot histogram rows (``bins``) and ``(k, P <= 12)`` gradient queries."""
    policy = DEFAULT if policy is None else policy
    elements = max(4, int(ndim))
    if "mi" in policy.losses:
        elements = max(elements, 12, policy.max_bins)
    return elements


def frame_limit(voxels: int, ndim: int, policy: Policy | None = None, *, shape=None) -> int:
    """The largest frame (bytes, header included) of a session over a fixed grid of ``voxels`` voxels:
    commands (:data:`MAX_COMMAND_BYTES`), or :func:`per_voxel_elements` ring elements per voxel; with
    the grid's ``shape``, also party2's B-spline share (``d`` per control point, at most
    ``d prod(s_i + 3)``), and the largest frame of each protocol registered with
    :func:`register_frame_bound` (CKKS ciphertexts: :func:`ppreg.secure.ckks.remote.frame_bound`)."""
    elements = per_voxel_elements(ndim, policy) * int(voxels)
    if shape is not None:
        elements = max(elements, len(shape) * math.prod(int(s) + 3 for s in shape))
    extra = max((int(fn(int(voxels), int(ndim), policy)) for fn in FRAME_BOUNDS), default=0)
    return max(MAX_HEADER_BYTES + max(MAX_COMMAND_BYTES, 8 * elements), extra)


def dealer_frame_limit(policy: Policy | None = None) -> int:
    """The largest frame the dealer receives: a command, or party1's GMS index bitmask over at most
    ``max_voxels`` voxels (party2 sends the dealer nothing)."""
    policy = DEFAULT if policy is None else policy
    return MAX_HEADER_BYTES + max(MAX_COMMAND_BYTES, (policy.max_voxels + 7) // 8)


# --- checking commands ------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


class Guard:
    """One follower's check of every command party1 announces (:meth:`check`, before its handler runs).

    Args:
        role: ``"party2"`` or ``"dealer"``.
        policy: its :class:`Policy`; ``None`` (one process: party1 and party2 are one user) checks
            only well-formedness, order and label reuse.
        voxels: party2's image voxel count (point count for point clouds): the unit of
            ``max_revealed_per_voxel`` and the largest level it accepts; ``None`` (the dealer, or an
            in-process party2 handed its values): the largest level announced.

    Attributes:
        revealed: numbers revealed to party1 so far (as counted in the module docstring).
        spline_functionals: of them, linear functionals of party2's image revealed by B-spline queries.
        iterations: iteration attempts so far, all levels.
    """

    def __init__(self, role: str, policy: Policy | None, *, voxels: int | None = None):
        self.role, self.policy = role, policy
        self.voxels = None if voxels is None else int(voxels)
        self.labels: set[str] = set()
        self.levels: dict[str, dict] = {}
        self.revealed = 0
        self.iterations = 0
        self.final_errors = 0
        self.spline_functionals = 0
        self.started = False
        self.halves = False
        self.point_clouds = False
        self._largest = 0

    # --- helpers -------------------------------------------------------------------------------

    def bad(self, op, detail):
        raise ProtocolError(f"{self.role}: malformed {op!r} command from party1: {detail}")

    def refuse(self, rule, detail):
        if self.policy is not None:
            raise PolicyError(self.role, rule, detail)

    def field(self, cmd, name, kind, *, optional=False):
        op = cmd["op"]
        if name not in cmd or cmd[name] is None:
            if optional:
                return None
            self.bad(op, f"no {name!r}")
        value = cmd[name]
        ok = {"int": _is_int, "real": _is_real, "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str) and 0 < len(v) <= _LABEL_CHARS}[kind](value)
        if not ok:
            self.bad(op, f"{name!r} must be {'a' if kind != 'int' else 'an'} {kind}, got {str(value)[:60]!r}")
        return value

    def count(self, cmd, name, lo=1, hi=None):
        value = int(self.field(cmd, name, "int"))
        if value < lo or (hi is not None and value > hi):
            self.bad(cmd["op"], f"{name!r} = {value} outside [{lo}, {hi if hi is not None else 'inf'}]")
        return value

    def shape_of(self, cmd, name="shape"):
        shape = cmd.get(name)
        if not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3) or not all(
                _is_int(s) and s >= 1 for s in shape):
            self.bad(cmd["op"], f"{name!r} must list 2 or 3 positive sizes, got {str(shape)[:60]!r}")
        return tuple(int(s) for s in shape)

    def key_of(self, cmd):
        key = cmd.get("key")
        if not (isinstance(key, dict) and isinstance(key.get("impl"), str) and isinstance(key.get("data"), list)
                and 0 < len(key["data"]) <= 8 and all(_is_int(v) and 0 <= v < 2**32 for v in key["data"])):
            self.bad(cmd["op"], f"malformed sampling key {str(key)[:60]!r}")

    def new_label(self, cmd, name="label"):
        label = self.field(cmd, name, "str")
        if label in self.labels:
            raise ProtocolError(f"{self.role}: label {label!r} was already used in this session; refusing to reuse "
                                "it (a reused label would reuse a mask)")
        self.labels.add(label)
        return label

    def level_of(self, cmd, name, *ops):
        """The open level ``cmd[name]`` names, opened by one of ``ops`` (ProtocolError otherwise)."""
        label = self.field(cmd, name, "str")
        level = self.levels.get(label)
        if level is None or level["op"] not in ops:
            raise ProtocolError(f"{self.role}: {cmd['op']!r} names {label!r}, which is not an open "
                                f"{' or '.join(map(repr, ops))} level")
        return level

    def require_loss(self, loss):
        if self.policy is not None and loss not in self.policy.losses:
            self.refuse("losses", f"loss {loss!r} is not allowed (allowed: {list(self.policy.losses)})")

    def require_transform(self, transform):
        if self.policy is not None and transform not in self.policy.transforms:
            self.refuse("transforms", f"transform {transform!r} is not allowed "
                                       f"(allowed: {list(self.policy.transforms)})")

    def check_voxels(self, op, n):
        limit = self.voxels if self.voxels is not None else (None if self.policy is None else self.policy.max_voxels)
        if limit is not None and n > limit:
            if self.voxels is not None:
                raise ProtocolError(f"{self.role}: {op!r} announces {n} voxels; party2's image has {self.voxels}")
            self.refuse("max_voxels", f"a level of {n} voxels exceeds {self.policy.max_voxels}")
        self._largest = max(self._largest, n)

    def check_samples(self, method, k, n, op):
        if method not in (None, "urs", "gms"):
            self.bad(op, f"unknown sampling method {str(method)[:40]!r}")
        if not 1 <= k <= n:
            self.bad(op, f"{k} samples of {n} voxels")
        p = self.policy
        if p is None:
            return
        if method == "gms" and not p.gms:
            self.refuse("gms", "gradient-magnitude sampling (indices chosen from party1's image) is not allowed")
        if k < p.min_samples:
            self.refuse("min_samples", f"{k} samples per query; the policy needs at least {p.min_samples}")

    def open_level(self, label, level):
        p = self.policy
        if p is not None and len(self.levels) + 1 > p.max_levels:
            self.refuse("max_levels", f"level {label!r} would be level {len(self.levels) + 1}; "
                                       f"the policy allows {p.max_levels} per session")
        self.levels[label] = dict(level, iterations=0)

    def iteration(self, level, label):
        p = self.policy
        if p is not None and level["iterations"] + 1 > p.max_iterations:
            self.refuse("max_iterations", f"iteration {level['iterations'] + 1} of level {label!r}; the policy "
                                           f"allows {p.max_iterations} per level")
        level["iterations"] += 1
        self.iterations += 1

    def sample(self, level, label):
        """Count an encrypted sample of party2's image sent on ``level`` (CKKS URS/v2): it reveals nothing,
        but each costs party2 an encryption, so a level gets at most ``max_iterations + 2`` (one per
        iteration, the level's own and the final error's); past that the policy refuses."""
        p, n = self.policy, level.get("samples", 0) + 1
        if p is not None and n > p.max_iterations + 2:
            self.refuse("max_iterations", f"encrypted sample {n} of level {label!r}; the policy allows "
                                           f"{p.max_iterations + 2} per level (max_iterations + 2)")
        level["samples"] = n

    def reveal(self, count, what):
        p, total = self.policy, self.revealed + int(count)
        if p is not None:
            if p.max_revealed is not None and total > p.max_revealed:
                self.refuse("max_revealed", f"{what} would bring the numbers revealed to party1 to {total}; "
                                             f"the policy allows {p.max_revealed}")
            unit = self.voxels if self.voxels is not None else max(self._largest, 1)
            if p.max_revealed_per_voxel is not None and total > p.max_revealed_per_voxel * unit:
                self.refuse("max_revealed_per_voxel",
                             f"{what} would bring the numbers revealed to party1 to {total} ({total / unit:.3g} "
                             f"per voxel of {unit}); the policy allows {p.max_revealed_per_voxel:g} per voxel")
        self.revealed = total

    def check_frac_bits(self, fb):
        p = self.policy
        if p is not None and not p.frac_bits[0] <= fb <= p.frac_bits[1]:
            self.refuse("frac_bits", f"{fb} fractional bits; the policy allows {list(p.frac_bits)}")

    # --- the check -----------------------------------------------------------------------------

    def check(self, cmd: dict) -> None:
        """Validate ``cmd`` and apply the policy before the follower runs it; update the counts.

        Raises:
            PolicyError: outside the policy (``rule`` names the key).
            ProtocolError: malformed, out of order, an unknown level, or a reused label.
        """
        op = cmd.get("op")
        if op not in FRAMEWORK and op not in OPERATIONS:
            raise ProtocolError(f"{self.role}: unknown operation {str(op)[:40]!r} from party1")
        if op == "setup":
            if self.started:
                raise ProtocolError(f"{self.role}: a second 'setup' in one session")
            self.started = True
        elif not self.started:
            raise ProtocolError(f"{self.role}: {op!r} before 'setup'")
        if op in OPERATIONS:
            p = self.policy
            if p is not None and p.operations is not None and op not in p.operations:
                self.refuse("operations", f"operation {op!r} is not allowed (allowed: {list(p.operations)})")
        method = getattr(self, "_op_" + op, None)
        if method is not None:
            method(cmd)
        else:
            CHECKS[op](self, cmd)

    def _op_setup(self, cmd):
        fb = self.count(cmd, "frac_bits", 0, 64)
        self.check_frac_bits(fb)

    def _op_describe(self, cmd):
        self.field(cmd, "exponent", "int")
        if abs(int(cmd["exponent"])) > 1024:
            self.bad("describe", f"exponent {cmd['exponent']} out of range")

    def _op_end(self, cmd):
        pass

    def _op_mask(self, cmd):
        label = self.new_label(cmd)
        n = self.count(cmd, "n")
        self.check_voxels("mask", n)
        factor = self.field(cmd, "factor", "int", optional=True)
        if factor is not None and factor < 1:
            self.bad("mask", f"factor {factor}")
        kind = self.field(cmd, "kind", "str", optional=True)
        level = {"op": "mask", "n": n, "kind": kind}
        if kind is None:  # the final error's level: no queries
            self.open_level(label, level)
            return
        if kind not in ("translation", "rigid", "affine"):
            self.bad("mask", f"unknown transform {kind[:40]!r}")
        self.require_loss("ssd")
        self.require_transform(kind)
        ndim = self.count(cmd, "ndim", 2, 3)
        k = self.count(cmd, "k")
        self.check_samples(cmd.get("method"), k, n, "mask")
        self.key_of(cmd)
        from ..transforms import n_params

        self.open_level(label, dict(level, ndim=ndim, k=k, params=n_params(kind, ndim)))

    def _op_query(self, cmd):
        label = self.new_label(cmd)
        level = self.level_of(cmd, "mask", "mask")
        self.count(cmd, "it", 0)
        if level["kind"] is None:
            raise ProtocolError(f"{self.role}: level {cmd['mask']!r} takes no queries (it has no transform)")
        self.require_loss("ssd")
        self.iteration(level, cmd["mask"])
        self.reveal(level["params"], f"query {label!r}")

    def _op_ssd(self, cmd):
        self.new_label(cmd)
        level = self.level_of(cmd, "mask", "mask", "spline_level")  # the full-resolution level's mask
        n = self.count(cmd, "n")
        if n != level["n"]:
            self.bad("ssd", f"{n} voxels on a level of {level['n']}")
        p = self.policy
        if p is not None and self.final_errors + 1 > p.max_final_errors:
            self.refuse("max_final_errors", f"final error {self.final_errors + 1}; the policy allows "
                                             f"{p.max_final_errors} per session")
        self.final_errors += 1
        self.reveal(1, "the final error")

    def _op_spline_level(self, cmd):
        label = self.new_label(cmd)
        self.require_loss("ssd")
        self.require_transform("bspline")
        shape = self.shape_of(cmd)
        n = self.count(cmd, "n")
        if n != math.prod(shape):
            self.bad("spline_level", f"{n} voxels on a grid {shape}")
        self.check_voxels("spline_level", n)
        k = self.count(cmd, "k")
        self.check_samples(cmd.get("method"), k, n, "spline_level")
        spacing = self.count(cmd, "spacing", 2, 1 << 16)
        sigma = self.field(cmd, "sigma", "real")
        if not 0 <= sigma <= 1024:
            self.bad("spline_level", f"sigma {sigma}")
        self.key_of(cmd)
        from ..bspline import control_grid_shape

        coefficients = len(shape) * math.prod(control_grid_shape(shape, spacing))
        check_spline_functionals(self.role, self.policy, self.spline_functionals + coefficients,  # one query must fit
                                 self.voxels or max(self._largest, 1), f"a query of B-spline level {label!r}")
        self.open_level(label, {"op": "spline_level", "n": n, "coefficients": coefficients})

    def _op_spline_query(self, cmd):
        label = self.new_label(cmd)
        level = self.level_of(cmd, "mask", "spline_level")
        self.count(cmd, "it", 0)
        self.iteration(level, cmd["mask"])
        total = self.spline_functionals + level["coefficients"]
        check_spline_functionals(self.role, self.policy, total, self.voxels or max(self._largest, 1),
                                 f"B-spline query {label!r}")
        self.reveal(level["coefficients"], f"B-spline query {label!r}")
        self.spline_functionals = total

    def _op_mi_level(self, cmd):
        label = self.new_label(cmd)
        self.require_loss("mi")
        kind = self.field(cmd, "kind", "str")
        if kind not in ("translation", "rigid", "affine"):
            self.bad("mi_level", f"unknown transform {kind[:40]!r}")
        self.require_transform(kind)
        shape = self.shape_of(cmd)
        n = self.count(cmd, "n")
        self.check_voxels("mi_level", n)
        self.count(cmd, "factor")
        k = self.count(cmd, "k")
        self.check_samples("urs" if k < n else None, k, n, "mi_level")
        bins = self.count(cmd, "bins", 2, 1 << 12)
        if self.policy is not None and bins > self.policy.max_bins:
            self.refuse("max_bins", f"{bins} histogram bins; the policy allows {self.policy.max_bins}")
        from ..transforms import n_params

        params = self.count(cmd, "params")
        if params != n_params(kind, len(shape)):
            self.bad("mi_level", f"{params} parameters for a {len(shape)}D {kind} transform")
        self.key_of(cmd)
        self.open_level(label, {"op": "mi_level", "n": n, "bins": bins, "params": params, "joints": set()})

    def _op_mi_joint(self, cmd):
        label = self.new_label(cmd)
        level = self.level_of(cmd, "level", "mi_level")
        self.count(cmd, "it", 0)
        self.iteration(level, cmd["level"])
        self.reveal(level["bins"] ** 2, f"joint histogram {label!r}")
        level["joints"].add(label)

    def _op_mi_grad(self, cmd):
        label = self.new_label(cmd)
        level = self.level_of(cmd, "level", "mi_level")
        self.count(cmd, "it", 0)
        joint = self.field(cmd, "joint", "str")
        if joint not in level["joints"]:
            raise ProtocolError(f"{self.role}: gradient round {label!r} follows no open histogram round {joint!r}")
        level["joints"].discard(joint)
        self.reveal(level["params"], f"MI gradient {label!r}")

    def _op_lcc_level(self, cmd):
        label = self.new_label(cmd)
        self.require_loss("lncc")
        self.require_transform("svf")
        shape = self.shape_of(cmd)
        n = math.prod(shape)
        self.check_voxels("lcc_level", n)
        self.count(cmd, "factor")
        symmetric = bool(self.field(cmd, "symmetric", "bool", optional=True))
        if symmetric and self.policy is not None and not self.policy.symmetric:
            self.refuse("symmetric", "symmetric lncc (party2 reveals its half velocity) is not allowed")
        self.check_frac_bits(self.count(cmd, "frac_bits", 0, 64))
        window = self.count(cmd, "window", 1, 63)
        if window % 2 == 0:
            self.bad("lcc_level", f"even window {window}")
        for name in ("eps", "floor"):
            if not self.field(cmd, name, "real") >= 0:
                self.bad("lcc_level", f"negative {name}")
        opened = self.field(cmd, "open", "str", optional=True) or "force"  # an old party1: the raw force
        if opened not in ("smoothed", "force"):
            self.bad("lcc_level", f"unknown 'open' {opened[:40]!r}")
        smoothed = opened == "smoothed"
        for name in ("step", "sigma_fluid", "sigma_diff"):
            self.field(cmd, name, "real", optional=not (symmetric or (smoothed and name == "sigma_fluid")))
        self.field(cmd, "steps", "int", optional=not symmetric)
        self.field(cmd, "first", "bool", optional=True)
        p = self.policy
        if p is not None and p.lncc_open == "smoothed":
            if not smoothed:
                self.refuse("lncc_open", "an lncc level that opens the raw per-voxel force; the policy allows only "
                                         "the smoothed force (--lncc-open smoothed)")
            elif not cmd["sigma_fluid"] >= p.min_fluid_sigma:
                self.refuse("min_fluid_sigma", f"smoothing sigma {cmd['sigma_fluid']:g} voxels; the policy needs at "
                                               f"least {p.min_fluid_sigma:g}")
        if smoothed and not cmd["sigma_fluid"] > 0:
            self.bad("lcc_level", f"smoothed with sigma_fluid {cmd['sigma_fluid']}")
        self.open_level(label, {"op": "lcc_level", "n": n, "ndim": len(shape), "symmetric": symmetric,
                                "open": opened})

    def _op_lcc_round(self, cmd):
        label = self.new_label(cmd)
        level = self.level_of(cmd, "level", "lcc_level")
        rnd = self.field(cmd, "round", "str")
        self.field(cmd, "retry", "bool", optional=True)
        from .protocols.lcc import rounds  # (lcc registers handlers: imported lazily, it imports roles)

        names = rounds(level["symmetric"])
        if rnd not in names:
            self.bad("lcc_round", f"unknown round {rnd[:40]!r}")
        if rnd == names[0]:  # an iteration (or a retry) starts: party1 will learn its force and the loss
            self.iteration(level, cmd["level"])
            self.reveal(level["n"] * level["ndim"] + 1, f"lncc iteration {label!r} ({level['open']} force)")

    def _op_lcc_halves(self, cmd):
        levels = [lv for lv in self.levels.values() if lv["op"] == "lcc_level" and lv["symmetric"]]
        if not levels or self.halves:
            raise ProtocolError(f"{self.role}: 'lcc_halves' without a symmetric lncc registration, or twice")
        self.halves = True
        self.require_loss("lncc")
        full = self.voxels if self.voxels is not None else max(lv["n"] for lv in levels)
        self.reveal(full * levels[-1]["ndim"], "party2's half velocity")

    def _op_points(self, cmd):
        label = self.new_label(cmd)
        self.require_loss("points")
        self.require_transform("rigid")
        if self.point_clouds:  # a registration needs one; each is d^2 functionals of party2's points that party1
            # weights as it likes, so ceil(n / d) of them (well inside max_revealed_per_voxel) solve for the points
            raise ProtocolError(f"{self.role}: a second point-cloud product {label!r} in one session; one is allowed "
                                "(with more, party1 can solve for party2's points)")
        self.point_clouds = True
        n = self.count(cmd, "n")
        d = self.count(cmd, "d", 2, 3)
        self.check_voxels("points", n)
        extent = self.field(cmd, "extent", "real")
        if not extent > 0:
            self.bad("points", f"extent {extent}")
        self.check_samples(None, n, n, "points")
        self.reveal(d * d + d, f"point clouds {label!r}")

    def summary(self) -> dict:
        """The counts so far, and the policy (``None``: none)."""
        return {"revealed": self.revealed, "iterations": self.iterations, "levels": len(self.levels),
                "final_errors": self.final_errors, "spline_functionals": self.spline_functionals,
                "policy": None if self.policy is None else self.policy.to_dict()}
