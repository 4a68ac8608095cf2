"""The ``imdb-dist`` command: train, launch, tune, evaluate, predict.

Exit status: 0 success; 2 bad input (one ``error: ...`` line on stderr);
1 a run that failed for a known reason (one line) or an internal error
(with its traceback); 128 + N stopped by signal N (143 SIGTERM, 130 Ctrl-C),
after saving a checkpoint when it came during training.
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from imdb_dist.config import OFFICIAL_SHA256, OFFICIAL_URL, load_config
from imdb_dist.errors import EXIT_BAD_INPUT, ArgumentParser, InputError, RunError
from imdb_dist.interrupt import Interrupted, stop_on_signals
from imdb_dist.logs import import_tensorflow_quietly, setup_logging

_MODEL_HELP = (
    "a complete run directory (its published model), RUN_DIR/model (its newest complete version) or "
    "RUN_DIR/model/<version>; a local path or a storage URI (s3://...)"
)
# Write failures that are the storage's state, not a bug: one line, exit 1.
_STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="imdb-dist", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    train = commands.add_parser("train", help="train in this process (CPU, one GPU, or all local GPUs)")
    _add_config_args(train)
    _add_change_arg(train)
    train.set_defaults(handler=_train)

    launch = commands.add_parser("launch", help="train on a Ray cluster (RAY_ADDRESS, else a local one) with Ray Train")
    _add_config_args(launch)
    _add_change_arg(launch)
    launch.set_defaults(handler=_launch)

    tune = commands.add_parser(
        "tune", help="search the config's tune.space with Ray Tune (RAY_ADDRESS, else a local cluster)"
    )
    _add_config_args(tune)
    tune.set_defaults(handler=_tune)

    evaluate = commands.add_parser("evaluate", help="score a labeled split with an exported model; prints JSON")
    evaluate.add_argument("--model", required=True, help=_MODEL_HELP)
    evaluate.add_argument(
        "--data",
        help="aclImdb directory or .tar.gz (or a tfds data_dir); default $IMDB_DATA, else the official "
        "archive, downloaded once and verified",
    )
    evaluate.add_argument("--split", default="test", choices=("test", "train", "validation"))
    evaluate.add_argument("--source", default="auto", choices=("auto", "aclimdb", "download", "tfds", "keras"))
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", help="score raw reviews; prints one JSON line per review")
    predict.add_argument("--model", required=True, help=_MODEL_HELP)
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="reviews to score")
    predict.add_argument("--file", type=Path, help="one review per line ('-' for stdin); blank lines are skipped")
    predict.set_defaults(handler=_predict)

    download = commands.add_parser(
        "download", help="fetch the dataset archive, verified against its sha256, into a directory; prints its path"
    )
    download.add_argument("--to", type=Path, help="the directory (default: the download cache, $IMDB_DIST_CACHE)")
    download.add_argument("--url", default=OFFICIAL_URL, help="the archive's URL (default: the official aclImdb)")
    download.add_argument("--sha256", default=OFFICIAL_SHA256, help="its sha256 (default: the official archive's)")
    download.set_defaults(handler=_download)
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (see job/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )


def _add_change_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--change",
        dest="changes",
        action="append",
        default=[],
        metavar="KEY",
        help="resuming a run, change this model-defining key from here on (e.g. train.learning_rate; "
        "repeatable; recorded in report.json): without it a resume that would train another model is refused",
    )


def _train(args: argparse.Namespace) -> int:
    from imdb_dist.data.sources import read_ahead
    from imdb_dist.fingerprint import check_changes

    cfg = load_config(args.config, args.overrides)
    check_changes(cfg, args.changes)
    # The archive is read on a second core while TensorFlow loads.
    reading = read_ahead(cfg.data)
    import_tensorflow_quietly()
    from imdb_dist.timings import since_process_start
    from imdb_dist.train import run

    with stop_on_signals() as stop:
        run(cfg, stop=stop, startup_s=since_process_start(), reading=reading, changes=args.changes)
    return 0


def _launch(args: argparse.Namespace) -> int:
    from imdb_dist.fingerprint import check_changes

    cfg = load_config(args.config, args.overrides)
    check_changes(cfg, args.changes)
    import_tensorflow_quietly()
    from imdb_dist.launch import launch

    launch(cfg, changes=args.changes)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from imdb_dist.tune import check_space

    cfg = load_config(args.config, args.overrides)
    check_space(cfg)  # a bad space fails before TensorFlow or Ray load
    import_tensorflow_quietly()
    from imdb_dist.tune import tune

    tune(cfg)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import_tensorflow_quietly()
    from imdb_dist.config import DataConfig
    from imdb_dist.data.sources import load_reviews
    from imdb_dist.evaluate import metrics, score_texts
    from imdb_dist.export import load_model, locate_model

    with locate_model(args.model, "--model") as path:
        model = load_model(path)
    # The validation split must be carved exactly as in training.
    data = DataConfig(
        source=args.source,
        path=args.data,
        validation_fraction=model.metadata["validation_fraction"],
        folds=model.metadata["folds"],
        fold=model.metadata["fold"],
        seed=model.metadata["seed"],
    )
    reviews = load_reviews(data, args.split)
    print(json.dumps(metrics(score_texts(model, reviews.texts), reviews.labels)))
    return 0


def _predict(args: argparse.Namespace) -> int:
    keyed = _predict_inputs(args)  # bad input fails before TensorFlow loads
    import_tensorflow_quietly()
    from imdb_dist.evaluate import label_of, score_texts
    from imdb_dist.export import load_model, locate_model

    with locate_model(args.model, "--model") as path:
        model = load_model(path)
    scores = score_texts(model, [text for _, text in keyed])
    for (key, _), score in zip(keyed, scores, strict=True):
        print(json.dumps({**key, "score": round(float(score), 6), "label": label_of(float(score))}))
    return 0


def _predict_inputs(args: argparse.Namespace) -> list[tuple[dict[str, int], str]]:
    """Each review with what identifies it in the output: its ``index`` or file ``line``."""
    if args.file is None:
        if not args.texts:
            raise InputError("predict needs review TEXT arguments or --file")
        return [({"index": i}, text) for i, text in enumerate(args.texts)]
    if args.texts:
        raise InputError("give reviews as TEXT arguments or --file, not both")
    try:
        raw = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
        lines = raw.decode("utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read --file {args.file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"--file {args.file} is not valid UTF-8 (byte {exc.start})") from None
    keyed = [({"line": n}, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not keyed:
        raise InputError(f"--file {args.file} holds no reviews")
    return keyed


def _download(args: argparse.Namespace) -> int:
    from imdb_dist.data.download import fetch

    print(fetch(args.url, args.sha256, args.to))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imdb-dist`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _STORAGE_FULL:
            raise
        # Checkpoints and exports say so themselves; this catches the small
        # files (metrics, config, vocabulary). The last checkpoint is intact.
        print(f"error: cannot write {exc.filename or 'the run directory'}: {exc.strerror}", file=sys.stderr)
        return 1


def console_main() -> int:
    """The ``imdb-dist`` console script: :func:`main`, then a prompt exit.

    On its way out Python runs its cyclic garbage collector over every object
    still alive: after training, TensorFlow's and the run's, 2 s of a
    ``fast.yaml`` run (measured). The process is ending, so those objects are
    frozen out of that pass (``gc.freeze``); exit handlers and module
    teardown still run, so files and TensorBoard writers close as before.
    """
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console_main())
