"""Label, check and train the alpha-predicting CNN that ppreg ships (ppreg/learned/models/alpha_cnn_2d).

004 Sec. 3.2 / 4.1 (Wang & Zhang): 2D bull's-eye pairs (100 x 100) whose targets are deformed by
initial velocities drawn from FLASH's prior at alpha in {3, 6, 11}
(:func:`ppreg.learned.alpha_data.synthesize_alpha_pairs`), each labelled with its marginal-posterior
(Laplace) ``alpha_MAP`` (:func:`ppreg.learned.alpha_data.label_alpha_map`), split 70/15/15
(:func:`ppreg.learned.alpha_data.split_indices` of all ``--pairs``).

Pair ``i`` is a deterministic function of ``(seed, i)``, so only the labels are stored: one JSON
shard per labelling worker under ``bench/alpha_labels/`` (``{"config", "labels": {i:
{"alpha_map", "alpha_true", "seconds"}}}``), rewritten atomically after every pair; a run that is
stopped resumes where it stopped (labels already present are skipped); test pairs are labelled first, then
validation, then train pairs, so a stopped run still has whole held-out splits. Training regenerates the
images from the seed.

Subcommands (from the repository root)::

    nice -n 10 python scripts/train_alpha_cnn.py label --worker 0 --workers 2 &   # and --worker 1
    nice -n 10 python scripts/train_alpha_cnn.py check --pairs 10     # fast labels vs the full estimate
    nice -n 10 python scripts/train_alpha_cnn.py train --epochs 60 --export ppreg/learned/models/alpha_cnn_2d

The labels use ``rounds=5`` with the early stop ``tol=1e-3`` and ``alpha_start=5`` (the geometric
middle of the drawn alphas); ``check`` compares them with the full estimate (5 rounds from
alpha 1, no early stop) and writes ``bench/results/alpha_label_check.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ppreg._atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "bench" / "alpha_labels"  # tracked (bench/results/ is not)
SEED = 0
PAIRS = 900
# The data and the (fast) label: everything a label depends on. Changing any of it starts a new label set.
CONFIG = {"seed": SEED, "shape": [100, 100], "alphas": [3.0, 6.0, 11.0], "band_size": 15, "noise": 0.03,
          "iterations": 150, "rounds": 5, "tol": 1e-3, "alpha_start": 5.0}
FULL = {"rounds": 5, "tol": 0.0, "alpha_start": 1.0}  # the reference estimate of `check`


def pairs(n: int, config: dict = CONFIG) -> dict:
    """The first ``n`` pairs of ``config`` (:func:`ppreg.learned.alpha_data.synthesize_alpha_pairs`)."""
    from ppreg.learned.alpha_data import synthesize_alpha_pairs

    return synthesize_alpha_pairs(config["seed"], n, shape=tuple(config["shape"]), alphas=config["alphas"],
                                  band_size=config["band_size"], noise=config["noise"])


def label_one(source, target, config: dict = CONFIG, **override) -> tuple[float, float]:
    """``(alpha_MAP, seconds)`` of one pair with the label settings of ``config`` (or ``override``)."""
    from ppreg.learned.alpha_data import label_alpha_map

    opts = {k: config[k] for k in ("band_size", "iterations", "rounds", "tol", "alpha_start")}
    opts.update(override)
    alpha, sec = label_alpha_map(source[None], target[None], sigma=config["noise"], **opts)
    return float(alpha[0]), float(sec)


def read_labels(directory: Path = LABELS, config: dict = CONFIG) -> dict[int, dict]:
    """All labels of ``config`` in the shards under ``directory``: ``{index: {"alpha_map", ...}}``.

    Raises:
        ValueError: a shard was labelled with another configuration.
    """
    out: dict[int, dict] = {}
    for shard in sorted(Path(directory).glob("labels_w*.json")):
        doc = json.loads(shard.read_text())
        if doc["config"] != config:
            raise ValueError(f"{shard} was labelled with {doc['config']}, expected {config}")
        out.update({int(i): v for i, v in doc["labels"].items()})
    return out


def cmd_label(args) -> None:
    shard = LABELS / f"labels_w{args.worker}.json"
    doc = json.loads(shard.read_text()) if shard.exists() else {"config": CONFIG, "labels": {}}
    if doc["config"] != CONFIG:
        raise SystemExit(f"{shard} holds labels of another configuration; move it away first")
    from ppreg.learned.alpha_data import split_indices

    data = pairs(args.pairs)
    # test, then validation, then train pairs: a run stopped early can still be evaluated on whole held-out splits
    split = split_indices(PAIRS, SEED)
    rank = {int(i): r for r, name in enumerate(("test", "val", "train")) for i in split[name]}
    todo = sorted((i for i in range(args.pairs) if i % args.workers == args.worker and str(i) not in doc["labels"]),
                  key=lambda i: (rank.get(i, 3), i))
    print(f"worker {args.worker}/{args.workers}: {len(todo)} pairs to label", flush=True)
    for i in todo:
        alpha, sec = label_one(data["source"][i], data["target"][i])
        doc["labels"][str(i)] = {"alpha_map": alpha, "alpha_true": float(data["alpha_true"][i]), "seconds": sec}
        atomic_write_text(shard, json.dumps(doc, indent=1) + "\n")
        print(f"{i} alpha_true {data['alpha_true'][i]:g} alpha_map {alpha:.4f} {sec:.1f} s", flush=True)


def cmd_check(args) -> None:
    """Fast labels vs the full estimate on the first ``--pairs`` test pairs (bench/results/alpha_label_check.json)."""
    from ppreg.learned.alpha_data import split_indices

    test = split_indices(PAIRS, SEED)["test"][:args.pairs]
    data = pairs(int(test.max()) + 1)
    labels = read_labels()
    out = ROOT / "bench" / "results" / "alpha_label_check.json"
    done = json.loads(out.read_text()) if out.exists() else {}
    rows = [r for r in done.get("rows", []) if done.get("config") == CONFIG and done.get("full") == FULL]
    for i in test:
        if any(r["index"] == int(i) for r in rows):  # resume
            continue
        if int(i) in labels:  # the fast label is a deterministic function of (config, i): reuse the stored one
            fast, t_fast = labels[int(i)]["alpha_map"], labels[int(i)]["seconds"]
        else:
            fast, t_fast = label_one(data["source"][i], data["target"][i])
        full, t_full = label_one(data["source"][i], data["target"][i], **FULL)
        rows.append({"index": int(i), "alpha_true": float(data["alpha_true"][i]), "fast": fast, "full": full,
                     "rel_diff": abs(fast - full) / full, "seconds_fast": t_fast, "seconds_full": t_full})
        print(rows[-1], flush=True)
        rel = np.asarray([r["rel_diff"] for r in rows])
        summary = {"pairs": len(rows), "median_rel_diff": float(np.median(rel)), "max_rel_diff": float(rel.max()),
                   "seconds_fast_mean": float(np.mean([r["seconds_fast"] for r in rows])),
                   "seconds_full_mean": float(np.mean([r["seconds_full"] for r in rows]))}
        atomic_write_text(out, json.dumps({"config": CONFIG, "full": FULL, "summary": summary, "rows": rows},
                                          indent=1) + "\n")  # after every pair: resumable
        print(summary, flush=True)


NETWORK = {"ndim": 2, "stream_features": [8, 16, 16, 32], "fusion_features": [32, 32, 32], "kernel_size": 5}


def scaled(source, target):
    """Both images over their common maximum |intensity|, as :func:`ppreg.spectral.register.register_flash`
    scales them before the network sees them: float32 ``(n, *shape)`` each."""
    peak = np.maximum(np.abs(source).max(axis=tuple(range(1, source.ndim))),
                      np.abs(target).max(axis=tuple(range(1, target.ndim))))
    shape = (-1,) + (1,) * (source.ndim - 1)
    return (source / peak.reshape(shape)).astype(np.float32), (target / peak.reshape(shape)).astype(np.float32)


def dataset(config: dict = CONFIG) -> dict:
    """The labelled pairs with their split (of all :data:`PAIRS`): ``{"source", "target", "alpha_map",
    "alpha_true", "v0", "index", "split"}``; images scaled by :func:`scaled`; ``v0`` the drawn initial
    velocities (complex64 band coefficients)."""
    from ppreg.learned.alpha_data import split_indices

    labels = read_labels(config=config)
    if not labels:
        raise SystemExit(f"no labels under {LABELS}: run the label subcommand first")
    index = np.asarray(sorted(labels))
    data = pairs(int(index.max()) + 1, config)
    source, target = scaled(data["source"][index], data["target"][index])
    split = split_indices(PAIRS, config["seed"])
    where = {name: np.flatnonzero(np.isin(index, idx)) for name, idx in split.items()}
    return {"source": source, "target": target, "index": index, "split": where, "v0": data["v0"][index],
            "alpha_map": np.asarray([labels[i]["alpha_map"] for i in index], np.float32),
            "alpha_true": np.asarray([labels[i]["alpha_true"] for i in index], np.float32)}


def _dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square on ``(B, n, n)`` (the prior and the bull's-eyes are
    invariant under them, so alpha is too)."""
    x = np.rot90(x, k % 4, axes=(1, 2))
    return np.ascontiguousarray(x[:, :, ::-1] if k >= 4 else x)


def cmd_train(args) -> None:
    """Train on the labelled train split, select the epoch by the validation loss, export the best."""
    import jax
    import jax.numpy as jnp

    from ppreg.learned import checkpoint
    from ppreg.learned.alpha_cnn import AlphaCNN, init_optimizer, make_optimizer, train_step

    data = dataset()
    tr, va = data["split"]["train"], data["split"]["val"]
    if len(tr) < args.batch_size or len(va) < 1:
        raise SystemExit(f"need >= {args.batch_size} labelled train pairs and one validation pair, got {len(tr)}, "
                         f"{len(va)}")
    kwargs = {**NETWORK, "log_alpha_init": float(np.mean(np.log(data["alpha_map"][tr])))}
    optimizer = make_optimizer(args.learning_rate, args.weight_decay)
    model = AlphaCNN(**kwargs, key=jax.random.key(SEED))
    opt_state = init_optimizer(optimizer, model)
    log = {"epochs": [], "best": None}
    state = args.out / "state"
    if (state / checkpoint.CONFIG_FILE).exists():  # resume
        ckpt = checkpoint.load(state)
        model, log = ckpt.model, json.loads((state / checkpoint.LOG_FILE).read_text())
        opt_state = checkpoint.load_tree(state / checkpoint.TRAIN_STATE_FILE, init_optimizer(optimizer, model))
        print(f"resumed after epoch {len(log['epochs'])}", flush=True)
    infer = jax.jit(lambda m, s, t: m(s, t))
    rng = np.random.default_rng(SEED)
    for _ in range(len(log["epochs"])):  # replay the shuffles of the epochs done
        rng.permutation(len(tr)), rng.integers(0, 8, len(tr) // args.batch_size)
    training = {"data": CONFIG, "labels": str(LABELS.relative_to(ROOT)), "pairs_labelled": int(len(data["index"])),
                "train": int(len(tr)), "val": int(len(va)), "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "weight_decay": args.weight_decay, "seed": SEED,
                "input": "source (moving) and target (fixed) over their common max |intensity|"}
    while len(log["epochs"]) < args.epochs:
        t0 = time.perf_counter()
        perm, syms = rng.permutation(len(tr)), rng.integers(0, 8, len(tr) // args.batch_size)
        losses = []
        for b in range(len(tr) // args.batch_size):
            idx = tr[perm[b * args.batch_size:(b + 1) * args.batch_size]]
            s, t = _dihedral(data["source"][idx], syms[b]), _dihedral(data["target"][idx], syms[b])
            model, opt_state, loss = train_step(model, opt_state, optimizer, s, t, data["alpha_map"][idx])
            losses.append(float(loss))
        pred = np.concatenate([np.asarray(infer(model, jnp.asarray(data["source"][va[i:i + 32]]),
                                                jnp.asarray(data["target"][va[i:i + 32]])))
                               for i in range(0, len(va), 32)])
        val = float(np.mean((pred - np.log(data["alpha_map"][va])) ** 2))
        epoch = len(log["epochs"]) + 1
        log["epochs"].append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val,
                              "seconds": time.perf_counter() - t0})
        best = log["best"] is None or val < log["best"]["val_loss"]
        if best:
            log["best"] = log["epochs"][-1]
            checkpoint.save(args.out / "best", model, architecture="AlphaCNN", kwargs=kwargs,
                            training={**training, "epochs": epoch, "val_loss": val})
        checkpoint.save(state, model, architecture="AlphaCNN", kwargs=kwargs, training=training,
                        train_state=opt_state, log=log)
        print(f"epoch {epoch} train {np.mean(losses):.4f} val {val:.4f}{' *' if best else ''} "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    if args.export is not None:
        best = checkpoint.load(args.out / "best")
        checkpoint.save(args.export, best.model, architecture="AlphaCNN", kwargs=kwargs,
                        training={**best.config["training"], "epochs_run": len(log["epochs"])},
                        log={"epochs": log["epochs"]})
        print(f"exported epoch {log['best']['epoch']} (val {log['best']['val_loss']:.4f}) to {args.export}")


def main(argv=None) -> None:
    """Parse the arguments and run a subcommand."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("label", help="label pairs (resumable)")
    lab.add_argument("--pairs", type=int, default=PAIRS)
    lab.add_argument("--worker", type=int, default=0)
    lab.add_argument("--workers", type=int, default=1)
    chk = sub.add_parser("check", help="fast labels vs the full Laplace estimate")
    chk.add_argument("--pairs", type=int, default=10)
    trn = sub.add_parser("train", help="train on the labelled train split (resumable) and export the best epoch")
    trn.add_argument("--epochs", type=int, default=60)
    trn.add_argument("--batch-size", type=int, default=16)
    trn.add_argument("--learning-rate", type=float, default=5e-4)
    trn.add_argument("--weight-decay", type=float, default=1e-4)
    trn.add_argument("--out", type=Path, required=True, help="resumable run folder (state, best epoch)")
    trn.add_argument("--export", type=Path, default=None, help="write the shipped form (best epoch) here")
    args = p.parse_args(argv)
    LABELS.mkdir(parents=True, exist_ok=True)
    {"label": cmd_label, "check": cmd_check, "train": cmd_train}[args.command](args)


if __name__ == "__main__":
    main()
