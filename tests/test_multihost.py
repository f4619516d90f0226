"""register_batch over two processes joined by JAX's distributed runtime (scripts/register_multihost.py).

Two processes on this machine, one CPU device each, so the batch's mesh spans devices of both and every
input and result crosses the process boundary (``make_array_from_callback``, ``process_allgather``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import ppreg
from ppreg.grid import gaussian_blur
from ppreg.party_cli import free_port

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = [(1.0, -2.0), (-1.5, 0.5), (0.0, 2.0)]


def _pairs(tmp_path: Path) -> Path:
    """Three 2D pairs (40 x 40, 1 mm): moving = fixed shifted by a known integer-or-half translation."""
    rng = np.random.default_rng(3)
    lines = ["id,fixed,moving"]
    for k, shift in enumerate(SHIFTS):
        fixed = np.asarray(gaussian_blur(rng.random((40, 40)).astype(np.float32), 2.0))
        grid = np.stack(np.meshgrid(np.arange(40.0), np.arange(40.0), indexing="ij"), -1)
        moving = np.asarray(ppreg.interpolate(fixed, grid + np.asarray(shift, np.float32)))
        ppreg.save(fixed, tmp_path / f"f{k}.nii.gz", affine=np.eye(4))
        ppreg.save(moving, tmp_path / f"m{k}.nii.gz", affine=np.eye(4))
        lines.append(f"p{k},f{k}.nii.gz,m{k}.nii.gz")
    csv = tmp_path / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_register_batch_over_two_processes_matches_one(tmp_path):
    csv, out = _pairs(tmp_path), tmp_path / "results.json"
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / "scripts" / "register_multihost.py"), str(csv), str(out), "--coordinator",
           coordinator, "--num-processes", "2", "--transform", "translation", "--levels", "2,1", "--timeout", "120"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    doc = json.loads(out.read_text())
    assert doc["processes"] == 2 and doc["devices"] == 2
    # the same pairs in this one process (one device): the sharded run must give the same registrations
    fixed = [ppreg.load(tmp_path / f"f{k}.nii.gz") for k in range(3)]
    moving = [ppreg.load(tmp_path / f"m{k}.nii.gz") for k in range(3)]
    local = ppreg.register_batch(fixed, moving, transform="translation", levels=(2, 1))
    for row, res, shift in zip(doc["pairs"], local, SHIFTS):
        assert abs(row["max_displacement_voxels"] - np.hypot(*shift)) < 0.05, row
        assert np.isclose(row["final_loss"], res.final_loss, rtol=1e-4, atol=1e-7), (row, res.final_loss)
        assert row["iterations"] == res.iterations
