"""Serving cost of an ensemble export against one network's: reviews scored per second.

Exports a preset's model twice, with ``model.members`` 1 and K (the
preset's, or ``--members``), each as the real serving SavedModel (the
tokenizer and the network, raw strings in), and times scoring the same
reviews through each, alternating rounds so both see the same machine
load. Scoring cost does not depend on the weights, so the networks are
not trained; the vocabulary is adapted on the reviews, so the token ids
and lengths are real.

    python -m bench.serving --data ../shared/data/imdb/aclImdb_train.tar.gz --preset job/configs/best.yaml
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.harness import median
from imdb_dist.config import load_config
from imdb_dist.data import pipeline
from imdb_dist.data.sources import load_reviews
from imdb_dist.evaluate import score_texts
from imdb_dist.export import export_model, load_model
from imdb_dist.model import build_model


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--preset", default="job/configs/best.yaml")
    parser.add_argument("--members", type=int, default=0, help="ensemble size to compare (default: the preset's)")
    parser.add_argument("--reviews", type=int, default=2500)
    harness.add_rounds(parser, default=3)
    args = parser.parse_args()
    cfg = load_config(args.preset, [f"data.path={args.data}"])
    members = args.members or cfg.model.members
    if members < 2:
        parser.error("compare against an ensemble: --members K with K >= 2, or a preset with model.members >= 2")
    texts = load_reviews(cfg.data, "train").texts
    tokenizer = pipeline.fit_tokenizer(texts, cfg.data.vocab_size)
    sample = texts[: args.reviews]
    seconds: dict[int, list[float]] = {1: [], members: []}
    with tempfile.TemporaryDirectory(prefix="imdb-dist-serving-") as tmp:
        served = {}
        for k in seconds:
            model = build_model(dataclasses.replace(cfg.model, members=k), tokenizer.vocabulary_size())
            served[k] = load_model(export_model(Path(tmp) / str(k), tokenizer, model, cfg.data.max_len, {}))
            score_texts(served[k], sample[:256])  # warm-up: trace the signature once
        for _ in range(args.rounds):
            for k, taken in seconds.items():
                start = time.perf_counter()
                score_texts(served[k], sample)
                taken.append(time.perf_counter() - start)
    per_s = {k: len(sample) / median(s) for k, s in seconds.items()}
    harness.emit(
        {
            "benchmark": "serving",
            "preset": args.preset,
            "reviews": len(sample),
            "seconds": {str(k): s for k, s in seconds.items()},
            "reviews_per_s_median": {str(k): v for k, v in per_s.items()},
            "ensemble_cost": per_s[1] / per_s[members],
        }
    )


if __name__ == "__main__":
    main()
