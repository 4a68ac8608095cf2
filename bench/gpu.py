"""GPU checks: the LSTM runs the cuDNN kernel, float32 vs mixed_float16, MirroredStrategy on 2 logical GPUs.

Under MirroredStrategy it times both routes for the embedding gradient
(gathered rows vs a dense all-reduce; :mod:`imdb_dist.aggregation`).

Needs a GPU; on a machine without one it prints ``"status": "not measured"``
(``--allow-cpu`` runs the throughput part on the CPU, to keep this script
working where there is no GPU). Uses synthetic token ids, so it needs no data:

    python -m bench.gpu --steps 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tensorflow as tf

from bench.timing import emit

MAX_LEN = 400
VOCAB = 20000


def split_first_gpu(parts: int) -> None:
    """Carve the first GPU into ``parts`` logical GPUs (before TensorFlow initialises it)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=8192)] * parts
        )


def lstm_runtime() -> int:
    """tf_keras's own report of the LSTM implementation that ran: 2 = cuDNN (GPU), 1 = generic."""
    import tf_keras as keras

    from imdb_dist.model import CUDNN_LSTM_ARGS

    layer = keras.layers.LSTM(70, return_runtime=True, **CUDNN_LSTM_ARGS)
    _, runtime = tf.function(layer)(tf.random.normal([8, 20, 64]))
    return int(runtime.numpy())


def throughput(
    precision: str, strategy: tf.distribute.Strategy, batch: int, steps: int, dense_gradients: bool = False
) -> float:
    """Training examples/s of the imdb-dist model on random token ids, full max_len batches."""
    import tf_keras as keras

    from imdb_dist.config import ModelConfig
    from imdb_dist.distribute import precision_policy
    from imdb_dist.model import build_model, compile_model

    rng = np.random.default_rng(0)
    x = rng.integers(1, VOCAB, size=(batch * 8, MAX_LEN))
    y = rng.integers(0, 2, size=(batch * 8,))
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch).prefetch(tf.data.AUTOTUNE)
    keras.utils.set_random_seed(0)
    with strategy.scope(), precision_policy(precision):
        model = build_model(ModelConfig(), VOCAB)
        compile_model(model, 0.001, dense_sparse_gradients=dense_gradients)
    model.fit(data, steps_per_epoch=5, epochs=1, verbose=0)  # tracing and autotuning
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--allow-cpu", action="store_true", help="run the throughput part without a GPU")
    args = parser.parse_args()
    split_first_gpu(2)
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus and not args.allow_cpu:
        emit({"benchmark": "gpu", "status": "not measured: no GPU on this machine"})
        return
    device = gpus[0].name if gpus else "/cpu:0"
    one = tf.distribute.OneDeviceStrategy(device)
    result = {
        "benchmark": "gpu",
        "status": "measured" if gpus else "cpu only (--allow-cpu)",
        "device": tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        if gpus else "cpu",
        "lstm_runtime": lstm_runtime() if gpus else None,
        "examples_per_s": {
            "float32": throughput("float32", one, args.batch, args.steps),
            "mixed_float16": throughput("mixed_float16", one, args.batch, args.steps),
        },
    }
    result["cudnn_lstm"] = result["lstm_runtime"] == 2 if gpus else None
    result["mixed_float16_speedup"] = result["examples_per_s"]["mixed_float16"] / result["examples_per_s"]["float32"]
    if len(gpus) >= 2:
        mirrored = tf.distribute.MirroredStrategy([g.name for g in gpus[:2]])
        result["mirrored_2_logical_gpus"] = {
            "replicas": mirrored.num_replicas_in_sync,
            "examples_per_s_mixed_float16": throughput("mixed_float16", mirrored, args.batch, args.steps),
            "examples_per_s_mixed_float16_dense_embedding_gradient": throughput(
                "mixed_float16", mirrored, args.batch, args.steps, dense_gradients=True
            ),
        }
    emit(result)


if __name__ == "__main__":
    main()
