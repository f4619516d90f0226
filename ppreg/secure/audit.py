"""The audit log: every quantity opened to a party, written as it happens (``ppreg party --audit FILE``).

A party's audit log is a JSON-lines file; each line is one quantity that was *opened* to a
party (decoded from shares, or received in the clear), never the uniform masked messages of
the protocol::

    {"seq": 3, "party": "party1", "direction": "received", "op": "query", "level": "L0/mask",
     "iteration": 2, "name": "R = M^T (a * J)", "shape": [6], "count": 6, "total": 18}

``count`` is the number of real numbers in the quantity, ``total`` the running count for this
party and direction. ``direction`` is ``"received"`` (the party itself learns the numbers) or,
in party2's log only, ``"released"`` (party2's own policy record,
:class:`~ppreg.secure.policy.Guard`, of the numbers the command lets party1 learn: one line per
command, counted before its handler runs, so a refused command leaves none). Hence, for a
completed session, party1's ``received`` total equals party2's ``released`` total and party2's
``policy.revealed`` in its report (one formula on party2's side, the actual decodes on party1's).

Where lines come from (the hooks): party1's decode points (``query``, ``spline_query``,
``mi_joint``, ``mi_grad``, ``lcc_round`` ``out``, ``lcc_halves``, ``ssd``); party2's own
receipts (its force in symmetric lncc; the GMS sample indices, a function of party1's image);
the dealer's (the GMS sample indices). The public description exchanged at ``describe``
(shape, affine, the power-of-two intensity exponent) and the iteration count are not counted.

Each line is written and flushed when the quantity is opened, so the log of a session that fails
holds everything opened before the failure. The file is created (truncated) when the log opens,
before any connection: a path that cannot be written is refused up front (:class:`AuditLog`).

Logs are attached to a channel and a party (:func:`attach`): in one process (``LocalPeers``)
party1 and party2 share one channel and may share one log (the ``party`` field tells them
apart); a channel without a log costs one dictionary lookup per opened quantity.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from pathlib import Path

DIRECTIONS = ("received", "released")
_LOGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # channel -> {party: AuditLog}
_ITERATION = re.compile(r"/it(\d+)(?:/|$)")


class AuditLog:
    """One JSON-lines audit file (module docstring).

    Args:
        path: the file; created or truncated now.

    Raises:
        ValueError: ``path`` cannot be opened for writing (a missing directory, no permission, a
            directory), naming the path and the reason.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (held open for the session)
        except OSError as exc:
            raise ValueError(f"cannot write the audit log {self.path}: {exc.strerror or exc}") from None
        self.seq = 0
        self.totals: dict[tuple[str, str], int] = {}
        self.by_name: dict[tuple[str, str, str], dict] = {}
        self._context: dict[str, dict] = {}

    def begin(self, party: str, cmd: dict) -> None:
        """The operation ``cmd`` starts for ``party``: later lines carry its op, level and iteration."""
        label = str(cmd.get("label", ""))
        level = cmd.get("level", cmd.get("mask"))
        iteration = cmd.get("it")
        if iteration is None:
            m = _ITERATION.search(label)
            iteration = None if m is None else int(m.group(1))
        self._context[party] = {"op": cmd.get("op"), "level": level if level is not None else (label or None),
                                "iteration": iteration}

    def record(self, party: str, name: str, shape, *, direction: str = "received", count: int | None = None) -> None:
        """Write one line: ``name`` of ``shape`` (``count`` numbers, default ``prod(shape)``) opened to
        ``party`` (``direction="released"``: party2's record of what it lets party1 learn)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        shape = [int(s) for s in shape]
        count = math.prod(shape) if count is None else int(count)
        key = (party, direction)
        self.totals[key] = self.totals.get(key, 0) + count
        self.seq += 1
        ctx = self._context.get(party, {"op": None, "level": None, "iteration": None})
        line = {"seq": self.seq, "party": party, "direction": direction, **ctx, "name": name, "shape": shape,
                "count": count, "total": self.totals[key]}
        entry = self.by_name.setdefault((party, direction, name), {"lines": 0, "count": 0})
        entry["lines"] += 1
        entry["count"] += count
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._file.flush()

    def summary(self, party: str | None = None) -> dict:
        """Totals for the report: ``{"received", "released", "quantities": [{"party", "direction",
        "name", "lines", "count"}], "path"}`` (``party``: only that party's lines)."""
        keep = (lambda p: True) if party is None else (lambda p: p == party)
        total = {d: sum(c for (p, dd), c in self.totals.items() if dd == d and keep(p)) for d in DIRECTIONS}
        quantities = [{"party": p, "direction": d, "name": n, **v} for (p, d, n), v in self.by_name.items() if keep(p)]
        return {**total, "quantities": quantities, "path": str(self.path)}

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def attach(channel, party: str, log: AuditLog | None) -> None:
    """Record what is opened to ``party`` on ``channel`` in ``log`` (``None``: nothing)."""
    if log is not None:
        _LOGS.setdefault(channel, {})[party] = log


def log_of(channel, party: str) -> AuditLog | None:
    """The log attached for ``party`` on ``channel``, or ``None``."""
    try:
        return _LOGS.get(channel, {}).get(party)
    except TypeError:  # a channel that cannot be weakly referenced carries no log
        return None


def begin(channel, party: str, cmd: dict) -> None:
    """Operation ``cmd`` starts for ``party`` (:meth:`AuditLog.begin`); no-op without a log."""
    log = log_of(channel, party)
    if log is not None:
        log.begin(party, cmd)


def opened(channel, party: str, name: str, shape, *, count: int | None = None) -> None:
    """``name`` (an array of ``shape``) was opened to ``party``: one ``received`` line; no-op without a log."""
    log = log_of(channel, party)
    if log is not None:
        log.record(party, name, shape, count=count)


def released(channel, party: str, name: str, count: int) -> None:
    """Party2's policy record: ``count`` numbers released to party1 by the current command."""
    log = log_of(channel, party)
    if log is not None:
        log.record(party, name, [int(count)], direction="released")
