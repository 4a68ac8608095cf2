"""The network, its precision policies and the distribution helpers.

Models are tiny (vocab 50, a few units) and trained for a step or two on
generated token ids, so the whole file runs in seconds on two CPU cores.
conftest splits the CPU into two logical devices, which gives
MirroredStrategy two replicas without a GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from imdb_dist.config import DistributionConfig, ModelConfig
from imdb_dist.distribute import (
    cluster_spec,
    is_chief,
    local_devices,
    local_replicas,
    make_strategy,
    precision_policy,
    resolve_precision,
    worker_index,
)
from imdb_dist.dropout import FastDropout, key_on_step
from imdb_dist.errors import ConfigError
from imdb_dist.model import (
    CUDNN_LSTM_ARGS,
    build_model,
    compile_model,
    members_crossentropy,
    min_length,
)

VOCAB = 50
CFG = ModelConfig(embedding_dim=8, conv_filters=4, kernel_size=3, pool_size=2, lstm_units=4)


def _batch(n: int = 8, length: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pre-padded token ids (real ids >= 2) and 0/1 labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(2, VOCAB, size=(n, length), dtype=np.int64)
    for i in range(n):
        x[i, : rng.integers(0, length // 2)] = 0  # some front padding
    y = np.arange(n) % 2
    return x, y.astype(np.float32)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under the default float32 policy."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- the network


def test_min_length_is_conv_plus_pool_window():
    assert min_length(CFG) == 3 + 2 - 1
    assert min_length(ModelConfig()) == 5 + 4 - 1


@pytest.mark.parametrize("length", [min_length(CFG), 37])
def test_build_model_outputs_one_probability_per_review(length):
    model = build_model(CFG, VOCAB)
    x, _ = _batch(n=3, length=length)
    out = model(x, training=False)
    assert out.shape == (3, 1)
    assert out.dtype == tf.float32
    values = out.numpy()
    assert np.all((values > 0) & (values < 1))


def test_build_model_accepts_inputs_of_different_lengths_in_one_model():
    model = build_model(CFG, VOCAB)
    assert model.input_shape == (None, None)
    short = model.predict(_batch(n=2, length=min_length(CFG))[0], verbose=0)
    long = model.predict(_batch(n=5, length=40)[0], verbose=0)
    assert short.shape == (2, 1) and long.shape == (5, 1)


def test_model_layers_in_order():
    model = build_model(CFG, VOCAB)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    expected = [
        keras.layers.Embedding,
        FastDropout,  # keras.layers.Dropout's subclass with a cheaper mask
        keras.layers.Conv1D,
        keras.layers.MaxPooling1D,
        keras.layers.LSTM,
        keras.layers.Dense,
    ]
    assert [type(layer) for layer in layers] == expected
    embedding, drop, conv, pool, lstm, dense = layers
    assert drop.rate == CFG.dropout
    assert embedding.input_dim == VOCAB and embedding.output_dim == CFG.embedding_dim
    assert conv.filters == CFG.conv_filters and conv.kernel_size == (CFG.kernel_size,)
    assert pool.pool_size == (CFG.pool_size,)
    assert lstm.units == CFG.lstm_units
    assert dense.units == 1 and dense.get_config()["activation"] == "sigmoid"
    assert embedding.mask_zero is False  # a left-padded mask would disqualify cuDNN


ENSEMBLE = dataclasses.replace(CFG, members=3)


def test_an_ensemble_holds_members_copies_of_the_layers_in_order_and_outputs_each_probability():
    model = build_model(ENSEMBLE, VOCAB)
    for i in range(3):
        kinds = [
            type(model.get_layer(f"m{i}_{name}")) for name in ("embedding", "dropout", "conv", "pool", "lstm", "score")
        ]
        assert kinds == [
            keras.layers.Embedding,
            FastDropout,
            keras.layers.Conv1D,
            keras.layers.MaxPooling1D,
            keras.layers.LSTM,
            keras.layers.Dense,
        ]
    one = build_model(CFG, VOCAB)
    assert len(model.trainable_weights) == 3 * len(one.trainable_weights)
    out = model(_batch(n=4)[0], training=False)
    assert out.shape == (4, 3) and out.dtype == tf.float32
    # Members start from their own initialisations: different predictions.
    assert len({tuple(np.round(out.numpy()[:, i], 6)) for i in range(3)}) == 3


def test_ensemble_loss_is_the_members_mean_loss_and_accuracy_is_the_mean_probabilitys():
    model = build_model(ENSEMBLE, VOCAB)
    compile_model(model, 0.01)
    x, y = _batch(n=16, length=12, seed=3)
    members = model(x, training=False).numpy()
    loss, accuracy = model.evaluate(x, y, verbose=0)
    bce = keras.losses.BinaryCrossentropy()
    each = [float(bce(y[:, None], members[:, i : i + 1])) for i in range(3)]
    np.testing.assert_allclose(loss, np.mean(each), rtol=1e-5)
    assert accuracy == pytest.approx(np.mean((members.mean(axis=1) > 0.5) == y))


def test_ensemble_members_are_trained_independently():
    """A member's gradient comes from its own loss only: members do not learn through the average."""
    model = build_model(ENSEMBLE, VOCAB)
    compile_model(model, 0.01)
    x, y = _batch(n=8, seed=4)
    with tf.GradientTape() as tape:
        members = model(x, training=False)
        loss = tf.reduce_mean(members_crossentropy(y, members))
    grads = tape.gradient(loss, model.trainable_weights)
    for i in range(3):
        alone = keras.Model(model.input, model.get_layer(f"m{i}_score").output)
        with tf.GradientTape() as tape:
            own = tf.reduce_mean(keras.losses.binary_crossentropy(y[:, None], alone(x, training=False)))
        own_grads = dict(zip([w.name for w in alone.trainable_weights], tape.gradient(own, alone.trainable_weights)))
        for weight, grad in zip(model.trainable_weights, grads):
            if weight.name in own_grads:  # 1/3: the loss is the mean over the three members
                np.testing.assert_allclose(
                    tf.convert_to_tensor(grad).numpy() * 3,
                    tf.convert_to_tensor(own_grads[weight.name]).numpy(),
                    atol=1e-6,
                )


def test_ensemble_members_draw_different_dropout_masks_at_one_step():
    model = build_model(dataclasses.replace(ENSEMBLE, dropout=0.5), VOCAB)
    step = tf.Variable(7, dtype=tf.int64)
    key_on_step(model, step, 1337)
    ones = tf.ones([2, 12, CFG.embedding_dim])
    masks = [model.get_layer(f"m{i}_dropout")(ones, training=True).numpy() for i in range(3)]
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


def test_lstm_config_is_cudnn_eligible():
    assert CUDNN_LSTM_ARGS == {
        "activation": "tanh",
        "recurrent_activation": "sigmoid",
        "recurrent_dropout": 0.0,
        "unroll": False,
        "use_bias": True,
    }
    model = build_model(CFG, VOCAB)
    config = model.get_layer("lstm").get_config()
    assert config["activation"] == "tanh"
    assert config["recurrent_activation"] == "sigmoid"
    assert config["recurrent_dropout"] == 0
    assert config["unroll"] is False
    assert config["use_bias"] is True
    # tf_keras's own verdict, computed from the same arguments at construction.
    assert model.get_layer("lstm")._could_use_gpu_kernel is True


# --------------------------------------------------------------------------- precision


def _train_steps(model, steps: int = 3) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = _batch(n=8, length=12, seed=step)
        losses.append(float(model.train_on_batch(x, y)[0]))
    return losses


def test_mixed_float16_computes_in_float16_with_float32_output_and_loss_scaling():
    with precision_policy("mixed_float16"):
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        model = build_model(CFG, VOCAB)
        compile_model(model, 1e-3)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert model.get_layer("conv").compute_dtype == "float16"
    assert model.get_layer("lstm").compute_dtype == "float16"
    assert model.get_layer("conv").variable_dtype == "float32"  # master weights stay float32
    assert model.get_layer("score").compute_dtype == "float32"
    assert model.output.dtype == tf.float32
    assert model(_batch(n=2)[0]).dtype == tf.float32
    assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
    losses = _train_steps(model)
    assert all(np.isfinite(losses)), losses


def test_mixed_bfloat16_computes_in_bfloat16_without_loss_scaling():
    with precision_policy("mixed_bfloat16"):
        model = build_model(CFG, VOCAB)
        compile_model(model, 1e-3)
    assert model.get_layer("conv").compute_dtype == "bfloat16"
    assert model.get_layer("lstm").compute_dtype == "bfloat16"
    assert model.output.dtype == tf.float32
    assert not isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
    losses = _train_steps(model)
    assert all(np.isfinite(losses)), losses


def test_cosine_decay_lowers_the_learning_rate_along_the_optimizer_steps():
    model = build_model(CFG, VOCAB)
    compile_model(model, 0.01, decay_steps=4)
    x, y = _batch(8)
    rates = []
    for _ in range(2):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        rates.append(float(model.optimizer.learning_rate))  # the rate of the last step taken
    # Steps 1 and 3 of 4 (0-based) on 0.01 * (1 + cos(pi * step / 4)) / 2.
    assert rates == pytest.approx([0.01 * (1 + np.cos(np.pi * s / 4)) / 2 for s in (1, 3)], rel=1e-4)
    constant = build_model(CFG, VOCAB)
    compile_model(constant, 0.01)
    constant.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert float(constant.optimizer.learning_rate) == pytest.approx(0.01)


def test_float32_policy_has_no_loss_scaling():
    model = build_model(CFG, VOCAB)
    compile_model(model, 1e-3)
    assert model.get_layer("lstm").compute_dtype == "float32"
    assert not isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_precision_policy_restores_the_previous_policy(name):
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if name == "mixed_float16" else "mixed_float16")
    previous = keras.mixed_precision.global_policy().name
    with precision_policy(name):
        assert keras.mixed_precision.global_policy().name == name
    assert keras.mixed_precision.global_policy().name == previous


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_precision_policy_restores_the_previous_policy_after_an_exception(name):
    with pytest.raises(RuntimeError, match="boom"), precision_policy(name):
        assert keras.mixed_precision.global_policy().name == name
        raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == "float32"


@pytest.mark.parametrize(("gpu", "expected"), [(False, "float32"), (True, "mixed_float16")])
def test_resolve_precision_auto_is_mixed_float16_on_gpus_only(gpu, expected):
    assert resolve_precision("auto", gpu=gpu) == expected


@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("gpu", [False, True])
def test_resolve_precision_passes_explicit_names_through(name, gpu):
    # Whether mixed_float16 may run without a GPU is check_devices' decision, tested below.
    assert resolve_precision(name, gpu=gpu) == name


# --------------------------------------------------------------------------- strategies


def _first_step(strategy: tf.distribute.Strategy, x, y):
    """Seeded init, loss before training, first-step loss and weights after it."""
    keras.utils.set_random_seed(42)
    with strategy.scope():
        # No dropout: its masks are drawn per replica, so they cannot match a single device.
        model = build_model(dataclasses.replace(CFG, dropout=0.0), VOCAB)
        compile_model(model, 1e-2)
    initial = [w.copy() for w in model.get_weights()]
    before = model.evaluate(x, y, batch_size=len(x), verbose=0)[0]
    first = float(model.train_on_batch(x, y)[0])
    return initial, before, first, model.get_weights()


def test_mirrored_strategy_matches_the_default_strategy_on_the_first_step():
    mirrored = make_strategy(DistributionConfig(strategy="mirrored", devices=("/cpu:0", "/cpu:1")))
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == 2
    default = make_strategy(DistributionConfig(strategy="default"))
    assert default.num_replicas_in_sync == 1
    x, y = _batch(n=8, length=16, seed=3)  # global batch 8: 4 per replica
    init_d, before_d, first_d, after_d = _first_step(default, x, y)
    init_m, before_m, first_m, after_m = _first_step(mirrored, x, y)
    for a, b in zip(init_d, init_m):
        np.testing.assert_array_equal(a, b)  # same seed, same initial weights
    assert before_m == pytest.approx(before_d, abs=1e-5)
    assert first_m == pytest.approx(first_d, abs=1e-5)
    assert first_d == pytest.approx(before_d, abs=1e-5)  # no dropout: step loss is the pre-step loss
    changed = False
    for a, b, start in zip(after_d, after_m, init_d):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
        changed |= not np.allclose(a, start)
    assert changed  # the step really moved the weights


def test_cpu_devices_mirror_over_the_logical_cpus_and_count_as_local_replicas():
    # conftest split this process's CPU in two before TensorFlow started: the same split is kept.
    strategy = make_strategy(DistributionConfig(cpu_devices=2))
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync == 2
    assert [d.rsplit("/", 1)[-1] for d in local_devices(strategy)] == ["device:CPU:0", "device:CPU:1"]
    assert local_replicas(strategy) == 2
    default = make_strategy(DistributionConfig(strategy="default"))
    assert local_devices(default) == () and local_replicas(default) == 1
    with pytest.raises(RuntimeError, match="cannot be modified after being initialized"):
        make_strategy(DistributionConfig(cpu_devices=3))  # another split, too late in this process


def test_make_strategy_default_is_the_default_strategy():
    strategy = make_strategy(DistributionConfig(strategy="default"))
    assert strategy is tf.distribute.get_strategy()
    assert strategy.num_replicas_in_sync == 1


def test_make_strategy_devices_only_for_mirrored():
    with pytest.raises(ConfigError, match="distribution.devices"):
        make_strategy(DistributionConfig(strategy="default", devices=("/cpu:0",)))


def test_make_strategy_multi_worker_without_tf_config_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG") as info:
        make_strategy(DistributionConfig(strategy="multi_worker"))
    assert info.value.key == "distribution.strategy"


def test_cluster_spec_unset_is_none(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cluster_spec() is None
    monkeypatch.setenv("TF_CONFIG", "  ")
    assert cluster_spec() is None


def test_cluster_spec_parses_a_valid_tf_config(monkeypatch):
    spec = '{"cluster": {"worker": ["h1:1", "h2:2"]}, "task": {"type": "worker", "index": 1}}'
    monkeypatch.setenv("TF_CONFIG", spec)
    assert cluster_spec() == {"cluster": {"worker": ["h1:1", "h2:2"]}, "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        '{"cluster": {"worker": ["h:1"]}}',  # no task
        '{"task": {"type": "worker", "index": 0}}',  # no cluster
        '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker"}}',  # task without index
        '["worker"]',
        '{"cluster": {"worker": ["h:1"]}, "task": {"type": "chief", "index": 0}}',  # task not in cluster
        '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 1}}',  # index out of range
    ],
    ids=["not-json", "no-task", "no-cluster", "no-index", "not-an-object", "unknown-type", "index-out-of-range"],
)
def test_malformed_tf_config_is_a_config_error_naming_it(monkeypatch, raw):
    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(ConfigError, match="TF_CONFIG") as info:
        cluster_spec()
    assert info.value.key == "TF_CONFIG"
    # make_strategy reads TF_CONFIG first, whatever strategy is asked for.
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        make_strategy(DistributionConfig(strategy="default"))


@pytest.mark.parametrize(
    "raw",
    [
        '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": "first"}}',
        '{"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": null}}',
        '{"cluster": {"worker": 1}, "task": {"type": "worker", "index": 0}}',
    ],
    ids=["index-not-a-number", "index-null", "cluster-entry-not-a-list"],
)
def test_mistyped_tf_config_is_a_config_error(monkeypatch, raw):
    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        cluster_spec()


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_single_process_strategies_are_their_own_chief(strategy):
    devices = ("/cpu:0", "/cpu:1") if strategy == "mirrored" else ()
    s = make_strategy(DistributionConfig(strategy=strategy, devices=devices))
    assert is_chief(s) is True
    assert worker_index(s) == (1, 0)
