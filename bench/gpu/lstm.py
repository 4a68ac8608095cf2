"""Which LSTM kernel the trained job layer runs, as tf_keras reports it at run time (2: cuDNN, 1: generic, 0: ineligible)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.harness import read_report

# tf_keras/src/layers/rnn/gru_lstm_utils.py: RUNTIME_UNKNOWN, RUNTIME_CPU, RUNTIME_GPU.
RUNTIMES = {
    0: "not eligible for cuDNN (its arguments rule it out): the generic loop",
    1: "the generic (standard) kernel",
    2: "the cuDNN kernel",
}


def lstm_runtime(model: Any, cfg: Any, texts: list[str]) -> dict[str, Any]:
    """The kernel the trained job LSTM runs, as tf_keras reports it at run time (2: cuDNN, 1: generic, 0: ineligible).

    An LSTM built from the job layer's own config plus ``return_runtime=True``
    (tf_keras' switch that makes the layer also return which implementation
    ran), holding the job layer's weights, is called in a tf.function under
    the run's strategy and dtype policy, on the activations that reach the
    job's LSTM (the model's output of the layer before it) for a batch of
    real reviews. The kernel is chosen when the function runs (tf_keras'
    implementation selector swaps cuDNN in on a GPU), so the returned
    runtime is what ran, not what the arguments allow.
    """
    import tensorflow as tf
    import tf_keras as keras

    from imdb_dist import rundir
    from imdb_dist.data.pipeline import Tokenizer, encode_padded
    from imdb_dist.distribute import local_devices, precision_policy

    job = next(layer for layer in model.layers if isinstance(layer, keras.layers.LSTM))  # member 0 of an ensemble
    run_dir = Path(cfg.run.output_dir)
    precision = read_report(run_dir)["precision"]
    strategy = model.distribute_strategy
    feeding = keras.Model(model.inputs, job.input)  # the job network up to its LSTM's input
    with strategy.scope(), precision_policy(precision):
        probe = keras.layers.LSTM.from_config({**job.get_config(), "return_runtime": True})
        probe.build(job.input_shape)
    probe.set_weights(job.get_weights())
    vocabulary = rundir.read_vocab(run_dir)
    assert vocabulary is not None, f"{run_dir} holds no vocabulary"
    per_replica = max(1, cfg.train.batch_size // strategy.num_replicas_in_sync)
    tokens = encode_padded(Tokenizer(vocabulary, cfg.data.vocab_size), tf.constant(texts[:per_replica]),
                           cfg.data.max_len)

    @tf.function
    def call(tokens: tf.Tensor) -> Any:
        def replica(tokens: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            activations = feeding(tokens, training=False)
            output, runtime = probe(activations)
            # The probe is the job's layer in all but the flag: the same outputs.
            differs = tf.reduce_max(tf.abs(tf.cast(output, tf.float32) - tf.cast(job(activations), tf.float32)))
            return runtime, differs, tf.shape(activations)

        return strategy.run(replica, args=(tokens,))

    runtime, differs, shape = call(tokens)
    runtimes = [int(value.numpy()) for value in strategy.experimental_local_results(runtime)]
    return {
        "runtime": runtimes[0],
        "per_replica": runtimes,
        "cudnn": all(r == 2 for r in runtimes),
        "layer": job.name,
        "precision": precision,
        "compute_dtype": probe.compute_dtype,
        "activations": {"dtype": feeding.output.dtype.name, "shape": [int(d) for d in
                                                                     strategy.experimental_local_results(shape)[0]]},
        "devices": list(local_devices(strategy)) or ["the default device"],
        "max_abs_diff_vs_job_layer": max(float(d.numpy()) for d in strategy.experimental_local_results(differs)),
        # Secondary: what the arguments allow (tf_keras' own flag, read, never acted on); the runtime is the answer.
        "eligible_by_arguments": getattr(job, "_could_use_gpu_kernel", None),
    }
