"""What a resumed run's metrics must equal on every CPU kind, and why not more.

The weights of a resumed run are the uninterrupted run's bit for bit (the
tests compare them with ``np.array_equal``). Its ``metrics.jsonl`` is too,
with one exception that float32 arithmetic forces: Keras keeps an epoch's
running training loss and accuracy per replica, a checkpoint saves the
replicas' sum, and a restore splits that sum evenly between them. With more
than one replica, the epoch a resume lands inside of then sums its values in
another order than the uninterrupted run did, and which order rounds which
way depends on the CPU's arithmetic (one AVX-512 kind rounded the same, an
Intel kind with native float16 one unit in the last place apart).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

# float32's unit roundoff: half the distance from 1.0 to the next float32.
FLOAT32_UNIT_ROUNDOFF = 2.0**-24

TRAINING_COLUMNS = ("loss", "accuracy")
LOSS_COLUMNS = (*TRAINING_COLUMNS, "val_loss", "val_accuracy")


def reordered_sum_tolerance(terms: int) -> float:
    """The relative gap allowed between float32 means of the same ``terms`` non-negative values in two orders.

    A float32 running sum of n values is within (n - 1)·u of the exact sum,
    relative, when none is negative (Higham, "Accuracy and Stability of
    Numerical Algorithms", 4.2); two orders are within twice that of each
    other, and the division by the count rounds once more in each. A step
    lost or trained twice moves the mean by about 1/n of a loss's spread: far
    more, at the sizes the tests train.
    """
    return 2 * (terms + 1) * FLOAT32_UNIT_ROUNDOFF


def assert_same_epoch_metrics(
    got: list[dict], want: list[dict], *, steps_per_epoch: int, replicas: int, split_epochs: Iterable[int] = ()
) -> None:
    """``got``'s loss columns equal ``want``'s: bitwise, except the training columns of ``split_epochs``.

    ``split_epochs``: the epochs (1-based) that a resume with more than one
    replica landed inside of; their training loss and accuracy are held to
    :func:`reordered_sum_tolerance` of the epoch's ``steps_per_epoch`` x
    ``replicas`` running values. Validation columns are computed afresh
    after each epoch, so they are always held bitwise.
    """
    split = set(split_epochs) if replicas > 1 else set()
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    tolerance = reordered_sum_tolerance(steps_per_epoch * replicas)
    for got_row, want_row in zip(got, want, strict=True):
        for key in LOSS_COLUMNS:
            if key in TRAINING_COLUMNS and got_row["epoch"] in split:
                gap = abs(got_row[key] - want_row[key])
                assert gap <= tolerance * abs(want_row[key]), (got_row["epoch"], key, got_row[key], want_row[key])
            else:
                assert got_row[key] == want_row[key], (got_row["epoch"], key, got_row[key], want_row[key])


def model_weights(run_dir: Path) -> dict[str, Any]:
    """The exported network's variables (the tokenizer's table left out), by checkpoint key, as numpy arrays."""
    import tensorflow as tf  # here: the metrics checks above need no TensorFlow

    reader = tf.train.load_checkpoint(str(run_dir / "model" / "1" / "variables" / "variables"))
    network = [key for key in reader.get_variable_to_shape_map() if key.startswith("network_variables/")]
    assert network, "the export holds no network variables under the expected key"
    return {key: reader.get_tensor(key) for key in network}
