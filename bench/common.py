"""Shared pieces of the benchmark scripts: run metadata, atomic JSON results, warm/cold timing, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax

from ppreg._atomic import atomic_write_text


def metadata(**extra) -> dict:
    """JAX version and backend, CPU count, machine, Python, date, plus ``extra``."""
    return {"jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            **extra}


def write_results(path: str, payload: dict, **extra) -> None:
    """Write ``{"meta": metadata(**extra), **payload}`` as JSON atomically and say so."""
    meta = metadata(**extra)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps({"meta": meta, **payload}, indent=2) + "\n")
    print(f"wrote {path} ({meta})")


def timed_twice(fn):
    """Call ``fn()`` twice: returns ``(second result, first call s, second call s)``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = fn()
    return result, first, time.perf_counter() - t0


def time_jax(fn, *args, repeats: int = 5) -> dict:
    """``{"first_s", "warm_s"}``: the first call of ``fn(*args)`` (compile + run) and the warm median of
    ``repeats`` more calls, seconds (``jax.block_until_ready`` on each result)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        warm.append(time.perf_counter() - t0)
    return {"first_s": first, "warm_s": statistics.median(warm)}


def fmt(value, spec: str) -> str:
    """``format(value, spec)``, or ``"-"`` for a missing value."""
    return "-" if value is None else format(value, spec)


def print_header(columns) -> None:
    """The header and separator lines of a ``|``-separated table."""
    print(" | ".join(columns))
    print(" | ".join("-" * len(c) for c in columns), flush=True)
