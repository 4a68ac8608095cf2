"""The token store, side by side: a Ray job's start at IMDB size against a baseline, and preparation and reads at 100x.

``imdb``: ``imdb-dist launch`` of ``ray-local.yaml`` (two workers, the real
reviews, ``--epochs`` epochs) as fresh processes with fresh HOMEs, this
tree's code against ``--baseline REV`` (checked out in a temporary worktree:
every worker tokenizing every review), alternating round by round. Each run
goes through ``bench/store_probe.py``, which records when the job was
submitted and, in every worker, when its process started, when its first
step point ended and its peak RSS. Reported per variant (medians): submit
to the first step point; each worker's start to it; each worker's peak RSS;
the chief's ``data`` and ``tokenize`` phases; the steady state's
examples/s (the last epoch's, from ``metrics.jsonl``).

``large``: a corpus ``--scale`` times IMDB's 25,000 reviews (several scales:
preparation at each, reads at the largest), generated in
memory, never written anywhere but the scratch directory's token stores:
each review's length (in words) drawn from the real reviews' lengths, its
words drawn from the real reviews' words by their frequency. Then:

- preparation: ``write_store`` with one local process, and with Ray Data
  on a local cluster of ``--cpus`` CPUs at 1 and 2 tasks at a time; wall
  time of each, that all three wrote the same bytes, the store's size;
- reads: one worker's input stream over a whole epoch (the global plan of
  ``ray-local.yaml``'s batch, with bucketing off and on), as a fresh process
  per worker, for 1 worker and for each of 2: its peak RSS, the bytes and
  requests it fetched from the store, its batches/s. The model is left
  out: a whole epoch of training at 100x is hours on this machine's CPUs.

``s3``: the real reviews' store (``ray-local.yaml``'s data settings), read
for a whole epoch by worker 0 of 2 (the bucketed plan) from a local
directory and from a loopback S3 server (moto's), as fresh processes,
alternating: batches/s, bytes, requests. Against the training step rate
of ``imdb``, it says whether the input stays ahead of the step on ``s3://``.

    python -m bench.store imdb --data ../shared/data/imdb/aclImdb_train.tar.gz --baseline e46efea --rounds 3
    python -m bench.store large --data ../shared/data/imdb/aclImdb_train.tar.gz --scale 1,10,100
    python -m bench.store s3 --data ../shared/data/imdb/aclImdb_train.tar.gz --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.baseline import REPO, describe_tree, worktree
from bench.machine import cpu_model

CONFIG = REPO / "job" / "configs" / "ray-local.yaml"
PROBE = REPO / "bench" / "store_probe.py"


# --------------------------------------------------------------------------- imdb: a Ray job, today against the store


def launch_once(tree: Path, data: str, epochs: int, scratch: Path) -> dict[str, Any]:
    """One ``imdb-dist launch`` through the probe, as a fresh process with a fresh HOME; what it measured."""
    home, out, storage = scratch / "home", scratch / "probe", scratch / "storage"
    home.mkdir(parents=True)
    sets = [f"data.path={data}", f"train.epochs={epochs}", f"ray.storage_path={storage}", "ray.name=job"]
    done = harness.run([sys.executable, str(PROBE), str(out), "--config", str(CONFIG),
                        *[arg for item in sets for arg in ("--set", item)]],
                       tree=tree, env={"HOME": str(home), "RAY_ADDRESS": None})
    submitted = json.loads((out / "driver.json").read_text())["submitted"]
    workers = [json.loads(path.read_text()) for path in sorted(out.glob("worker-*.json"))]
    report = harness.read_report(storage / "job")
    records = harness.read_records(storage / "job")
    phases = report["timings"]["phases_s"]
    return {
        "process_wall_s": done.wall_s,
        "submit_to_first_step_s": max(w["first_step_point"] for w in workers) - submitted,
        "worker_start_to_first_step_s": [w["first_step_point"] - w["process_started"] for w in workers],
        "worker_peak_rss_mb": [w["peak_rss_mb"] for w in workers],
        "worker_peak_rss_mb_at_first_step": [w["peak_rss_mb_at_first_step"] for w in workers],
        "chief_data_s": phases.get("data", 0.0),
        "chief_tokenize_s": phases.get("tokenize", 0.0),
        "steady_examples_per_s": records[-1]["examples_per_s"],
        "val_accuracy": report["validation"]["accuracy"],
        "batches_digest": report["batches_digest"],
    }


def imdb(args: argparse.Namespace) -> dict[str, Any]:
    args.data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-store-") as scratch, contextlib.ExitStack() as stack:
        trees = {"store": REPO}
        if args.baseline:
            trees["today"] = stack.enter_context(worktree(args.baseline, Path(scratch) / "baseline"))

        def variant(name: str, tree: Path):
            def once(round_: int) -> dict[str, Any]:
                where = Path(scratch) / f"{name}-{round_}"
                try:
                    return launch_once(tree, args.data, args.epochs, where)
                finally:
                    shutil.rmtree(where, ignore_errors=True)
            return once

        order = ["today", "store"] if args.baseline else ["store"]
        runs = harness.interleave({name: variant(name, trees[name]) for name in order}, args.rounds)
    keys = ("process_wall_s", "submit_to_first_step_s", "chief_data_s", "chief_tokenize_s", "steady_examples_per_s")
    summary: dict[str, Any] = {"runs": runs, "medians": {}}
    for name, results in runs.items():
        medians = harness.medians(results, keys)
        for key in ("worker_start_to_first_step_s", "worker_peak_rss_mb", "worker_peak_rss_mb_at_first_step"):
            medians[key] = harness.median([value for result in results for value in result[key]])
        summary["medians"][name] = medians
    if args.baseline:
        today, store = summary["medians"]["today"], summary["medians"]["store"]
        summary["store_over_today"] = {key: store[key] / today[key] for key in store if today[key]}
        summary["same_batches"] = {r["batches_digest"] for r in runs["today"] + runs["store"]} == {
            runs["today"][0]["batches_digest"]}
    return summary


# --------------------------------------------------------------------------- large: a generated corpus


def generate(data: str, scale: int, seed: int) -> Any:
    """``scale`` x the real training reviews' count, lengths drawn from theirs, words from theirs by frequency."""
    import tensorflow as tf

    from imdb_dist.data.pipeline import split_words
    from imdb_dist.data.sources import Reviews, read_aclimdb

    real = read_aclimdb(data, "train")
    words = split_words(tf.constant(real.texts))
    lengths = words.row_lengths().numpy()
    tokens, _, counts = tf.unique_with_counts(words.flat_values)
    vocabulary = np.array([token.decode("utf-8") for token in tokens.numpy()], dtype=object)
    weights = counts.numpy() / counts.numpy().sum()
    rng = np.random.default_rng(seed)
    n = scale * len(real)
    texts: list[str] = []
    for start in range(0, n, 16384):
        size = min(16384, n - start)
        review_lengths = rng.choice(lengths, size=size)
        drawn = vocabulary[rng.choice(len(vocabulary), size=int(review_lengths.sum()), p=weights)]
        for piece in np.split(drawn, np.cumsum(review_lengths)[:-1]):
            texts.append(" ".join(piece))
        harness.progress(f"generated {len(texts)} of {n} reviews")
    return Reviews(texts, rng.integers(0, 2, n).astype(np.int32)), {
        "reviews": n, "real_distinct_words": len(vocabulary), "mean_words": float(lengths.mean()),
        "text_mb": sum(len(text) for text in texts) / 1e6,
    }


def digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def prepare_all(reviews: Any, scratch: Path, cpus: int, vocab_size: int, max_len: int) -> dict[str, Any]:
    """Each engine writes the store of ``reviews`` (90% train, 10% validation); times, sizes, same bytes."""
    import ray

    from imdb_dist.data import preparation
    from imdb_dist.data.sources import subset

    n = len(reviews)
    splits = {"train": subset(reviews, np.arange(n // 10, n)), "validation": subset(reviews, np.arange(n // 10))}
    engines = {"local": preparation.LocalEngine(), "ray_data_1": preparation.RayDataEngine(1),
               "ray_data_2": preparation.RayDataEngine(2)}
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
    results: dict[str, Any] = {}
    try:
        for name, engine in engines.items():
            target = scratch / name
            target.mkdir()
            started = time.perf_counter()
            vocabulary, section = preparation.write_store(target, splits, engine, vocab_size=vocab_size,
                                                          max_len=max_len)
            results[name] = {"wall_s": time.perf_counter() - started, "digests": digests(target)}
            if name == "local":  # kept for the reads: what the run directory's manifest and vocab.txt would hold
                kept = section, vocabulary
            harness.progress(f"{name}: {results[name]['wall_s']:.1f} s")
            if name != "local":
                shutil.rmtree(target)
    finally:
        ray.shutdown()
    same = len({json.dumps(result.pop("digests"), sort_keys=True) for result in results.values()}) == 1
    sizes = {path.name: path.stat().st_size for path in (scratch / "local").iterdir()}
    section, vocabulary = kept
    (scratch / "local" / "section.json").write_text(json.dumps(section))
    (scratch / "local" / "vocab.txt").write_text("".join(f"{t}\n" for t in vocabulary), encoding="utf-8")
    return {"engines": results, "same_bytes": same, "store_bytes": sizes, "store_mb": sum(sizes.values()) / 1e6}


def _peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM): getrusage's ru_maxrss keeps the forking parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_epoch(args: argparse.Namespace) -> dict[str, Any]:
    """(In a fresh process) worker ``--worker`` of ``--workers``: its input stream over one epoch of the store."""
    from imdb_dist.logs import import_tensorflow_quietly

    import_tensorflow_quietly()
    from imdb_dist import storage
    from imdb_dist.config import load_config
    from imdb_dist.data import plan, store

    cfg = load_config(CONFIG, [])
    directory = Path(args.store)
    section = json.loads((directory / "section.json").read_text())
    vocabulary = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    baseline_mb = _peak_rss_mb()
    files = store.remote_files(storage.parse(args.uri, "--uri")) if args.uri else store.local_files(directory)
    examples = store.open_split(files, section, "train", vocabulary)
    global_plan = plan.GlobalPlan(examples.lengths, batch_size=cfg.train.batch_size, seed=cfg.data.seed,
                                  max_len=cfg.data.max_len, min_len=5,
                                  bucket_width=cfg.data.bucket_width if args.bucketing else None)
    share = plan.Share(args.workers, args.workers, args.worker)
    started = time.perf_counter()
    batches = 0
    for _ in plan.stream(examples, global_plan, share, epochs=1):
        batches += 1
    wall = time.perf_counter() - started
    return {
        "batches": batches, "batches_per_s": batches / wall, "fetched_bytes": examples.fetched_bytes,
        "requests": examples.requests, "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_mb_before_the_store": baseline_mb,
    }


def large(args: argparse.Namespace) -> dict[str, Any]:
    from imdb_dist.config import load_config
    from imdb_dist.logs import import_tensorflow_quietly

    import_tensorflow_quietly()
    cfg = load_config(CONFIG, [])
    scales = sorted({int(scale) for scale in args.scale.split(",")})
    preparations: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-large-") as scratch_name:
        for scale in scales:
            scratch = Path(scratch_name) / f"x{scale}"
            scratch.mkdir()
            reviews, corpus = generate(args.data, scale, seed=1)
            preparations[f"x{scale}"] = {"corpus": corpus, **prepare_all(reviews, scratch, args.cpus,
                                                                          cfg.data.vocab_size, cfg.data.max_len)}
            del reviews
        directory = scratch / "local"  # the largest; with the manifest entry and vocabulary the readers need
        reads: dict[str, Any] = {}
        for bucketing in (False, True):
            for workers in (1, 2):
                for worker in range(workers):
                    name = f"{'bucketed' if bucketing else 'plain'} {worker} of {workers}"
                    done = harness.run([sys.executable, "-m", "bench.store", "read", "--store", str(directory),
                                        "--workers", str(workers), "--worker", str(worker),
                                        *(["--bucketing"] if bucketing else [])])
                    reads[name] = harness.summary_of(done)
                    harness.progress(f"{name}: {json.dumps(reads[name])}")
    return {"preparation": preparations, "reads_at": f"x{scales[-1]}", "reads": reads}


def remote_reads(args: argparse.Namespace) -> dict[str, Any]:
    """The real reviews' store read by worker 0 of 2 for an epoch: from a local directory, and from S3 on loopback."""
    from bench import uploads
    from imdb_dist.config import load_config
    from imdb_dist.data import preparation
    from imdb_dist.data.sources import load_training_splits

    cfg = load_config(CONFIG, [f"data.path={args.data}"])
    train, val = load_training_splits(cfg.data)
    with tempfile.TemporaryDirectory(prefix="bench-store-s3-") as scratch_name:
        directory = Path(scratch_name)
        vocabulary, section = preparation.write_store(directory, {"train": train, "validation": val},
                                                      preparation.LocalEngine(), vocab_size=cfg.data.vocab_size,
                                                      max_len=cfg.data.max_len)
        names = [path.name for path in directory.iterdir()]
        (directory / "section.json").write_text(json.dumps(section))
        (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in vocabulary), encoding="utf-8")
        server, endpoint = uploads.start_s3()
        try:
            client = uploads.s3_client(endpoint)
            for name in names:
                client.upload_file(str(directory / name), uploads.BUCKET, f"store/{name}")
            uri = f"s3://{uploads.BUCKET}/store?endpoint_override={endpoint}&scheme=http"

            def reads(extra: list[str]):
                def once(round_: int) -> dict[str, Any]:
                    done = harness.run([sys.executable, "-m", "bench.store", "read", "--store", str(directory),
                                        "--workers", "2", "--worker", "0", "--bucketing", *extra],
                                       env=uploads.CREDENTIALS)
                    return harness.summary_of(done)
                return once

            runs = harness.interleave({"local": reads([]), "s3": reads(["--uri", uri])}, args.rounds)
        finally:
            server.terminate()
            server.wait(timeout=30)
    keys = ("batches_per_s", "fetched_bytes", "requests", "peak_rss_mb")
    return {"runs": runs, "medians": {name: harness.medians(results, keys) for name, results in runs.items()}}


def main() -> None:
    parser = harness.parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("imdb", help="a Ray job at IMDB size, this tree against --baseline")
    harness.add_data(first, help="aclImdb directory or .tar.gz (made absolute: the runs start in their trees)")
    first.add_argument("--baseline", help="git revision of today's data path (every worker tokenizing)")
    first.add_argument("--epochs", type=harness.at_least_one, default=2)
    harness.add_rounds(first, 3)
    harness.add_output(first)
    second = commands.add_parser("large", help="preparation and reads on a generated corpus --scale x IMDB")
    harness.add_data(second)
    second.add_argument("--scale", default="100", help="times IMDB's reviews; comma-separated for several "
                        "(preparation at each, reads at the largest)")
    second.add_argument("--cpus", type=harness.at_least_one, default=2, help="the local Ray cluster's CPUs")
    harness.add_output(second)
    reader = commands.add_parser("read", help="(internal) one worker's epoch of reads")
    reader.add_argument("--store", required=True)
    reader.add_argument("--workers", type=int, required=True)
    reader.add_argument("--worker", type=int, required=True)
    reader.add_argument("--bucketing", action="store_true")
    reader.add_argument("--uri", help="read the store's files there instead (its manifest entry from --store)")
    remote = commands.add_parser("s3", help="one worker's reads of the IMDB store, local against a loopback S3")
    harness.add_data(remote)
    harness.add_rounds(remote, 3)
    harness.add_output(remote)
    args = parser.parse_args()
    if args.command == "read":
        harness.emit(read_epoch(args))
        return
    summary = {"imdb": imdb, "large": large, "s3": remote_reads}[args.command](args)
    summary.update({"command": " ".join(sys.argv), "machine": cpu_model(), "tree": describe_tree()})
    harness.emit(summary, args.output)


if __name__ == "__main__":
    main()
