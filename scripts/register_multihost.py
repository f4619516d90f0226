"""Worked example: one :func:`ppreg.register_batch` over several processes with JAX's distributed runtime.

Start one process per host (or several on one machine, to try it), all with the same pairs file::

    python scripts/register_multihost.py PAIRS.csv RESULTS.json --coordinator host0:1234 \\
        --num-processes 2 --process-id 0          # on host0
    python scripts/register_multihost.py PAIRS.csv RESULTS.json --coordinator host0:1234 \\
        --num-processes 2 --process-id 1          # on host1

Under a cluster manager that JAX detects (Slurm, Open MPI, Kubernetes, Cloud TPU) leave out the three
options: ``jax.distributed.initialize()`` finds them itself. ``PAIRS.csv`` is the file of ``ppreg batch``
(columns ``fixed``, ``moving``, optional ``id``; paths relative to its folder), read by every process. The
batch is sharded over every process's devices (a 1-D mesh over ``jax.devices()``); each device registers
its slice and every process receives all results (``process_allgather``). Process 0 writes
``RESULTS.json`` (atomically): per pair its id, final loss, iterations and the largest displacement in
voxels, plus the device count. On CPU the cross-process collectives are JAX's default (gloo);
``tests/test_multihost.py`` runs two processes on one machine this way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    """Parse the arguments, join the distributed runtime, register every pair, write the JSON (process 0)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", type=Path, help="pairs CSV (as ppreg batch)")
    p.add_argument("out", type=Path, help="results JSON, written by process 0")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (omit under a cluster manager)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--transform", default="affine")
    p.add_argument("--loss", default="ssd")
    p.add_argument("--levels", default="4,2,1", help="pyramid factors, coarse to fine")
    p.add_argument("--timeout", type=int, default=300, help="seconds to wait for the other processes")
    args = p.parse_args(argv)

    import jax

    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=args.timeout)
    import numpy as np

    import ppreg
    from ppreg._atomic import atomic_write_text
    from ppreg.batch_cli import read_pairs

    rows = read_pairs(args.pairs, SystemExit)  # every process reads the same list, in the same order
    fixed = [ppreg.load(r["fixed"]) for r in rows]
    moving = [ppreg.load(r["moving"]) for r in rows]
    start = time.perf_counter()
    results = ppreg.register_batch(fixed, moving, transform=args.transform, loss=args.loss,
                                   levels=tuple(int(f) for f in args.levels.split(",")))
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:
        pairs = [{"id": r["id"], "final_loss": float(res.final_loss), "iterations": int(res.iterations),
                  "max_displacement_voxels": float(np.linalg.norm(res.displacement(), axis=-1).max())}
                 for r, res in zip(rows, results)]
        doc = {"processes": jax.process_count(), "devices": jax.device_count(), "transform": args.transform,
               "loss": args.loss, "seconds": seconds, "pairs": pairs}
        atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
        print(f"{len(pairs)} pairs over {jax.device_count()} devices in {jax.process_count()} processes: "
              f"{seconds:.1f} s; wrote {args.out}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
