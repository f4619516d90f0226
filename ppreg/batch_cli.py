"""``ppreg batch PAIRS.csv -o OUTDIR [registration options]``: many pairs through :func:`ppreg.register_batch`.

``PAIRS.csv`` has a header with the columns ``fixed`` and ``moving`` (NIfTI paths, relative to the CSV's
folder unless absolute), and optionally ``fixed_labels`` / ``moving_labels`` (integer label maps on the
fixed / moving grid: the pair's Dice) and ``id`` (the pair's folder name, unique even ignoring case, not
``summary.csv`` / ``summary.json``; default the row number ``0001``, ...). Each pair gets ``OUTDIR/ID/``
with the files ``ppreg register`` writes (:func:`ppreg.cli.write_outputs`) plus ``done.json`` (its summary
row, the pair's absolute paths and the registration options), written atomically last: a rerun skips the
rows whose ``done.json`` records the same paths and options (resumable; a row whose paths or options
changed, e.g. a default id that names another pair after an edit of the CSV, is registered again) and
registers the others. Pairs of one shape run as one vmapped computation, ``--batch-size`` pairs at a time
(a tqdm progress bar counts pairs on stderr). A bad row (missing file, unreadable image, 2D vs 3D,
non-finite voxels, one label map without the other, a label map that is empty or not on its image's grid, a
diverged registration, a batch that fails as a whole, e.g. out of memory) is
reported in the summary (status ``error`` and the message) and the others go on; its folder gets no
``done.json``, so a rerun retries it. ``OUTDIR/summary.csv`` and ``summary.json`` (written atomically
at the end) hold one row per CSV row: ``id``, ``status``, ``dice`` (mean over the labels present, with
labels), ``folding`` (voxels with a non-positive Jacobian determinant of ``x + u(x)``,
:func:`ppreg.metrics.folding`), ``time_s`` (the pair's share of its batch's registration time),
``final_loss``, ``iterations``, ``error``. Exit status 0 when every row succeeded, 1 otherwise; 2 for a
bad CSV or option.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from ._atomic import atomic_write_text
from .grid import identity_grid
from .metrics import folding, mean_dice
from .warp import interpolate_nearest

COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "id")
SUMMARY = ("id", "status", "dice", "folding", "time_s", "final_loss", "iterations", "error")
DONE = "done.json"
RESERVED = ("summary.csv", "summary.json")  # OUTDIR's own files: no pair folder may take their names
LABELS = ("fixed_labels", "moving_labels")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def add_parser(sub, add_registration_options, inits) -> None:
    """The ``batch`` subcommand (its registration options are ``ppreg register``'s)."""
    p = sub.add_parser("batch", help="register the pairs listed in a CSV file (fixed, moving[, labels, id])")
    p.add_argument("pairs", type=Path, help="CSV with columns fixed, moving [, fixed_labels, moving_labels, id]")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (one folder per pair)")
    add_registration_options(p)
    p.add_argument("--init", choices=inits, default="header", help="starting alignment (as ppreg register)")
    p.add_argument("--batch-size", type=_positive, default=16,
                   help="pairs registered together (one vmapped computation per shape; default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def read_pairs(path: Path, error) -> list[dict]:
    """The rows of a pairs CSV, paths resolved against its folder.

    Raises:
        error (the CLI's error class): an unreadable file, missing or unknown columns, an empty or
            malformed row, a duplicated or unsafe id.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # utf-8-sig: a spreadsheet's byte-order mark
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read the pairs file {path}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in ("fixed", "moving") if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if missing or unknown or repeated:  # a repeated column: csv keeps its last value, silently
        raise error(f"{path}: the header must have the columns fixed, moving (optional fixed_labels, moving_labels, "
                    f"id), each once; missing {missing}, unknown {unknown}, repeated {repeated}")
    path, rows, seen = Path(path), [], set()
    for n, raw in enumerate(reader, start=1):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if None in raw:
            raise error(f"{path}: row {n} has more fields than the header")
        if not row.get("fixed") or not row.get("moving"):
            raise error(f"{path}: row {n} has no fixed or moving path")
        pid = row.get("id") or f"{n:04d}"
        folded = pid.casefold()  # one folder on a case-insensitive file system
        if not _SAFE_ID.match(pid) or folded in RESERVED or folded in seen:
            why = "repeated (ignoring case)" if folded in seen else "not a safe folder name"
            raise error(f"{path}: row {n}: id {pid!r} is {why}")
        seen.add(folded)
        resolve = (lambda p: None if not p else p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
        rows.append({"id": pid, **{c: resolve(row.get(c)) for c in ("fixed", "moving", "fixed_labels",
                                                                    "moving_labels")}})
    if not rows:
        raise error(f"{path}: no pairs")
    return rows


def _options(args, error) -> dict:
    """``register_batch`` keyword arguments from the parsed registration options."""
    from .batch import BATCHED

    if args.secure != "none" or args.transform not in BATCHED or args.audit is not None or args.plot:
        raise error(f"ppreg batch runs clear registration with the transforms {', '.join(BATCHED)} (no --secure, "
                    "--audit or --plot); use ppreg register per pair")
    return dict(transform=args.transform, loss=args.loss, levels=args.levels, init=args.init,
                max_iterations=args.max_iterations, key=args.seed, sampling=args.sampling, fraction=args.fraction,
                spacing=args.spacing, regularization=args.regularization, bins=args.bins, step_size=args.step_size,
                fluid_sigma=args.fluid_sigma, diffusion_sigma=args.diffusion_sigma, symmetric=args.symmetric,
                optimizer=args.optimizer, histogram_matching=args.histogram_matching)


def _label_dice(result, fixed_labels, moving_labels) -> float:
    """Mean Dice of the fixed labels and the moving labels pulled back by the result (nearest neighbour)."""
    coords = identity_grid(fixed_labels.shape) + np.asarray(result.displacement())
    warped = np.asarray(interpolate_nearest(np.asarray(moving_labels.data), coords))
    return mean_dice(np.rint(fixed_labels.data).astype(np.int64), np.rint(warped).astype(np.int64))


def _row(pid, status, *, result=None, dice=None, error=None) -> dict:
    out = dict.fromkeys(SUMMARY)
    out.update(id=pid, status=status, dice=dice, error=error)
    if result is not None:
        out.update(folding=folding(result.displacement())["voxels"], time_s=round(result.time_s["party1"], 4),
                   final_loss=result.final_loss, iterations=result.iterations)
    return out


def run_batch(args, error, load, write_outputs) -> int:
    """Run ``ppreg batch`` (module docstring); ``load(path, ndim=None)`` reads an image (raising ``error``),
    ``write_outputs`` is :func:`ppreg.cli.write_outputs`."""
    from tqdm import tqdm

    from .batch import register_batch

    rows = read_pairs(args.pairs, error)
    options = _options(args, error)
    out = Path(args.output)
    summary: dict[str, dict] = {}
    todo = []
    for row in rows:
        row["done"] = {"pair": _pair_paths(row), "options": json.loads(json.dumps(options))}
        done = out / row["id"] / DONE
        if done.is_file():
            try:
                doc = json.loads(done.read_text())
            except (OSError, ValueError):
                doc = None  # an unreadable marker: register the pair again
            if isinstance(doc, dict) and all(doc.get(k) == v for k, v in row["done"].items()):
                summary[row["id"]] = dict({k: doc.get(k) for k in SUMMARY}, id=row["id"], status="ok")
                continue
            done.unlink(missing_ok=True)  # another pair's or other options' marker: not this row's
        todo.append(row)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="pair", disable=args.no_progress)
    for start in range(0, len(todo), args.batch_size):
        chunk, loaded = todo[start:start + args.batch_size], []
        for row in chunk:
            try:
                images = {c: load(row[c]) for c in ("fixed", "moving", *LABELS) if row[c]}
                _check_labels(row, images, error)
            except error as exc:
                summary[row["id"]] = _row(row["id"], "error", error=str(exc))
                bar.update(1)
                continue
            loaded.append((row, images))
        if loaded:
            try:
                results = register_batch([im["fixed"] for _, im in loaded], [im["moving"] for _, im in loaded],
                                         errors="return", **options)
            except (ValueError, TypeError) as exc:  # an option every pair shares: nothing can run
                raise error(str(exc)) from None
            except Exception as exc:  # noqa: BLE001 -- e.g. XLA out of memory: this chunk's pairs fail, not the run
                results = [RuntimeError(f"the batch of {len(loaded)} pairs failed ({type(exc).__name__}: {exc}); "
                                        "try a smaller --batch-size")] * len(loaded)
            for (row, images), result in zip(loaded, results):
                summary[row["id"]] = _finish(out / row["id"], row, images, result, write_outputs)
                bar.update(1)
    bar.close()
    table = [summary[row["id"]] for row in rows]
    _write_summary(out, table)
    failed = sum(r["status"] == "error" for r in table)
    print(f"ppreg batch: {len(table) - failed} of {len(table)} pairs registered ({len(rows) - len(todo)} were "
          f"already done); summary in {out / 'summary.csv'}")
    return 1 if failed else 0


def _pair_paths(row) -> dict:
    """The row's image paths, absolute (the pair's identity in ``done.json``)."""
    return {c: None if not row[c] else os.path.abspath(row[c]) for c in ("fixed", "moving", *LABELS)}


def _check_labels(row, images, error) -> None:
    """Both label maps or neither, each on its image's grid and not empty (else ``error``, naming the file)."""
    given = [c for c in LABELS if c in images]
    if len(given) == 1:
        other = next(c for c in LABELS if c not in images)
        raise error(f"the row has {given[0]} but no {other}: Dice needs both label maps (leave both empty for none)")
    for c in (c for c in LABELS if c in images):
        side = c.split("_")[0]  # fixed or moving: the grid the label map must be on
        labels, shape = np.asarray(images[c].data), np.shape(images[side].data)
        if labels.shape != shape:
            raise error(f"{c} {row[c]} has shape {labels.shape} but the {side} image {row[side]} has shape {shape}")
        if not np.any(np.rint(labels)):
            raise error(f"{c} {row[c]} is empty (every voxel is background 0): no label to score")


def _finish(folder: Path, row: dict, images: dict, result, write_outputs) -> dict:
    """Write one pair's folder (``done.json`` last) and return its summary row; an error becomes the row."""
    pid = row["id"]
    if isinstance(result, Exception):  # register_batch's "pair i: " names a place in the chunk, not the row
        return _row(pid, "error", error=re.sub(r"^pair \d+: ", "", str(result)))
    try:
        dice = None
        if "fixed_labels" in images and "moving_labels" in images:
            dice = _label_dice(result, images["fixed_labels"], images["moving_labels"])
        write_outputs(folder, result, images["fixed"].affine, moving_shape=images["moving"].data.shape)
        summary_row = _row(pid, "ok", result=result, dice=dice)
        atomic_write_text(folder / DONE, json.dumps({**summary_row, **row["done"]}, indent=2) + "\n")
        return summary_row
    except (ValueError, OSError) as exc:  # labels of another shape, a full disk: this row only
        return _row(pid, "error", error=str(exc))


def _write_summary(out: Path, table: list[dict]) -> None:
    """``summary.csv`` and ``summary.json`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if r.get(k) is None else r[k] for k in SUMMARY} for r in table])
    atomic_write_text(out / "summary.csv", buf.getvalue())
    atomic_write_text(out / "summary.json", json.dumps(table, indent=2) + "\n")
