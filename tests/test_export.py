"""The exported SavedModel: raw strings in, probabilities out, and refusals of non-exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from imdb_dist import rundir
from imdb_dist.config import ModelConfig
from imdb_dist.data import pipeline
from imdb_dist.errors import InputError
from imdb_dist.evaluate import score_texts
from imdb_dist.export import METADATA, export_model, find_export, load_model
from imdb_dist.model import build_model

TEXTS = ["superb and charming film", "", "   ", "dreadful<br />tedious plot", "Ça, c'était très bien 🎬"]


@pytest.fixture
def parts():
    tokenizer = pipeline.fit_tokenizer(["superb charming film", "dreadful tedious plot", "the film"], 40)
    model = build_model(ModelConfig(embedding_dim=8, conv_filters=4, kernel_size=3, pool_size=2, lstm_units=4), 40)
    return tokenizer, model


def test_export_scores_raw_strings_like_the_model(parts, tmp_path: Path) -> None:
    tokenizer, model = parts
    export = export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={"seed": 1})
    served = load_model(tmp_path / "model")
    assert served.path == export == tmp_path / "model" / "1"
    scores = score_texts(served, TEXTS)
    expected = model(pipeline.encode_padded(tokenizer, tf.constant(TEXTS), 16)).numpy()[:, 0]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores.dtype == np.float32 and scores.shape == (len(TEXTS),)
    assert served.metadata == {"seed": 1}


def test_an_ensemble_exports_as_one_model_serving_the_mean_of_its_members(tmp_path: Path) -> None:
    tokenizer = pipeline.fit_tokenizer(["superb charming film", "dreadful tedious plot", "the film"], 40)
    cfg = ModelConfig(embedding_dim=8, conv_filters=4, kernel_size=3, pool_size=2, lstm_units=4, members=3)
    model = build_model(cfg, 40)
    export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={})
    scores = score_texts(load_model(tmp_path / "model"), TEXTS)
    members = model(pipeline.encode_padded(tokenizer, tf.constant(TEXTS), 16)).numpy()
    assert members.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(scores, members.mean(axis=1), rtol=1e-5, atol=1e-6)
    assert scores.shape == (len(TEXTS),)


def test_signature_takes_strings_and_returns_float32_probabilities(parts, tmp_path: Path) -> None:
    tokenizer, model = parts
    export = export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={})
    signature = tf.saved_model.load(str(export)).signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]
    out = signature.structured_outputs["score"]
    assert out.dtype == tf.float32 and out.shape.as_list() == [None, 1]
    assert 0 < float(signature(text=tf.constant(["film"]))["score"][0, 0]) < 1


def test_re_export_replaces_the_version_and_leaves_no_temporaries(parts, tmp_path: Path) -> None:
    tokenizer, model = parts
    export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={"n": 1})
    export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={"n": 2})
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["1"]
    assert load_model(tmp_path / "model").metadata == {"n": 2}


def test_the_highest_version_is_served(parts, tmp_path: Path) -> None:
    tokenizer, model = parts
    export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={}, version=1)
    export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={}, version=3)
    (tmp_path / "model" / "10").mkdir()  # a version dir without a SavedModel is not a version
    assert find_export(tmp_path / "model") == tmp_path / "model" / "3"


def test_the_run_export_is_found_from_the_run_model_dir(trained_run: Path) -> None:
    assert load_model(trained_run / rundir.MODEL).path == trained_run / rundir.MODEL / "1"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "holds no complete imdb-dist model export"),
        (lambda p: (p / "saved_model.pb").write_bytes(b"not a protobuf") and p, "not a loadable SavedModel"),
    ],
    ids=["missing", "empty-dir", "garbage-pb"],
)
def test_non_exports_are_refused(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_model(make(tmp_path))


def test_a_foreign_saved_model_is_refused(tmp_path: Path) -> None:
    module = tf.Module()
    module.double = tf.function(lambda x: {"y": 2 * x}, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "other"))
    with pytest.raises(InputError, match="not an imdb-dist export"):
        load_model(tmp_path / "other")


def test_an_export_with_corrupt_metadata_is_refused(parts, tmp_path: Path) -> None:
    tokenizer, model = parts
    export = export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={})
    (export / METADATA).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        load_model(export)


def test_export_metadata_lives_beside_the_saved_model(parts, tmp_path: Path) -> None:
    tokenizer, model = parts
    export = export_model(tmp_path / "model", tokenizer, model, max_len=16, metadata={"max_len": 16})
    assert (export / METADATA).is_file()
