"""Training-phase seconds per epoch, timed inside the process as a Keras callback."""

from __future__ import annotations

import time

import tf_keras as keras


class TrainTimer(keras.callbacks.Callback):
    """Per epoch: seconds of the training phase (up to validation), wall time so far, val accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.train_s: list[float] = []
        self.val_accuracy: list[float] = []
        self.wall_s: list[float] = []  # since the start of training, at each epoch's end
        self._start = self._stop = self._begin = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._begin = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start, self._stop = time.perf_counter(), 0.0

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._stop = self._stop or time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.train_s.append((self._stop or time.perf_counter()) - self._start)
        self.wall_s.append(time.perf_counter() - self._begin)
        if logs and "val_accuracy" in logs:
            self.val_accuracy.append(float(logs["val_accuracy"]))
