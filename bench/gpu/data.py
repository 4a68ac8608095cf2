"""The reviews the GPU benchmark's runs read: --data, $IMDB_DATA or ../shared's (or a subset of it), else generated."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bench.baseline import REPO

SHARED_DATA = REPO.parent / "shared" / "data" / "imdb" / "aclImdb_train.tar.gz"


def resolve_data(args: argparse.Namespace, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The reviews the runs read, and how the JSON names them."""
    source = args.data or os.environ.get("IMDB_DATA") or (str(SHARED_DATA) if SHARED_DATA.is_file() else None)
    per_class = args.reviews or (256 if args.cpu_rehearsal else None)
    if source is None:
        per_class = per_class or 12_500  # the size of IMDB's training split
        path = write_synthetic(workdir / "synthetic", per_class)
        return path, {"data": "synthetic", "reviews_per_class": per_class}
    if per_class is None:
        return Path(source).resolve(), {"data": str(source)}
    path, taken = subset(Path(source), per_class, workdir / "subset")
    return path, {"data": str(source), "reviews_per_class": taken}


def subset(source: Path, per_class: int, where: Path) -> tuple[Path, int]:
    """The first ``per_class`` training reviews of each class of ``source`` (or all, if fewer), in the aclImdb layout.

    Returns the new aclImdb directory and the reviews it holds of its smaller class.
    """
    from imdb_dist.data.sources import read_aclimdb

    reviews = read_aclimdb(source, "train")
    base = where / "aclImdb"
    taken = []
    for label, name in ((1, "pos"), (0, "neg")):
        folder = base / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        chosen = [t for t, y in zip(reviews.texts, reviews.labels, strict=True) if int(y) == label][:per_class]
        for i, text in enumerate(chosen):
            (folder / f"{i}_{8 if label else 2}.txt").write_text(text, encoding="utf-8")
        taken.append(len(chosen))
    return base, min(taken)


SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "gu", "zo", "fi", "be", "no",
             "ra", "te", "wu", "xi", "ya", "so", "me", "ti", "ha", "ko", "lu", "pa", "ve", "di", "nu")


def write_synthetic(root: Path, per_class: int, seed: int = 0) -> Path:
    """``per_class`` made-up reviews per class in the aclImdb layout (``aclImdb/train/{pos,neg}/ID_RATING.txt``).

    Shaped like IMDB where it matters to the job's speed: a vocabulary of
    ~28,000 made-up words drawn with Zipf-like frequencies (so the 20,000-word
    vocabulary fills), and lengths drawn log-normally around IMDB's (median
    near 180 words, a long tail past 400, so bucketing and truncation both
    work). A few words per review carry its class, so the model can learn.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array([a + b for a in SYLLABLES for b in SYLLABLES]
                     + [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES], dtype=object)
    rng.shuffle(words)
    cues = {1: words[:40], 0: words[40:80]}  # each class's telling words
    common = words[80:]
    frequency = 1.0 / (np.arange(len(common)) + 3.0)
    labels = np.repeat([1, 0], per_class)
    lengths = np.clip(rng.lognormal(5.2, 0.75, size=len(labels)), 10, 2000).astype(int)
    drawn = common[rng.choice(len(common), size=int(lengths.sum()), p=frequency / frequency.sum())]
    owner = np.repeat(labels, lengths)
    telling = rng.random(len(drawn)) < 0.04
    for label, cue in cues.items():
        here = telling & (owner == label)
        drawn[here] = cue[rng.integers(0, len(cue), size=int(here.sum()))]
    base = root / "aclImdb"
    ends = np.cumsum(lengths)
    counters = {1: 0, 0: 0}
    for label in (1, 0):
        (base / "train" / ("pos" if label else "neg")).mkdir(parents=True, exist_ok=True)
    for label, end, length in zip(labels, ends, lengths, strict=True):
        review = drawn[end - length:end]
        half = len(review) // 2  # IMDB's reviews hold HTML line breaks
        text = " ".join(review[:half]) + " <br /><br /> " + " ".join(review[half:]) + "."
        rating = int(rng.integers(7, 11)) if label else int(rng.integers(1, 5))
        name = "pos" if label else "neg"
        (base / "train" / name / f"{counters[label]}_{rating}.txt").write_text(text, encoding="utf-8")
        counters[label] += 1
    return base
