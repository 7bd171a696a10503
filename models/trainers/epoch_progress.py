"""The Trainers' console output: a tqdm bar over each epoch's steps, and one short line per epoch.

Keras's own `verbose=2` prints every logged metric of every epoch (the cascade Trainer logs 14, so
its lines run to 400 characters), and `verbose=1` redraws its bar with control characters that
fill a log file or CI output. `EpochProgress` replaces both (fit with `verbose=0`):

- when stdout is a terminal, a tqdm bar counts the epoch's steps (`tqdm`, which leaves no trace
  once the epoch ends);
- at each epoch's end one line, always:

      teacher epoch 1/3: 156 steps, 6.1s, loss 0.3723, logistic 0.3723

  naming only the metrics the Trainer chose (every metric still goes to TensorBoard and the run
  log's eval metrics).
"""
import sys
import time
from typing import Optional, Sequence, TextIO

import tensorflow as tf


class EpochProgress(tf.keras.callbacks.Callback):
    """Progress of `Model.fit` for the console: see the module docstring."""

    def __init__(self, name: str, metrics: Sequence[str] = ("loss",), stream: Optional[TextIO] = None,
                 bar: Optional[bool] = None):
        """`bar`: draw the tqdm bar (default: when `stream` is a terminal)."""
        super().__init__()
        self._supports_tf_logs = True  # it reads no per-batch logs: Keras need not convert them to numpy
        self._name, self._metrics = name, tuple(metrics)
        self._stream = stream or sys.stdout
        self._bar_wanted = self._stream.isatty() if bar is None else bar
        self._bar = None

    def _implements_train_batch_hooks(self) -> bool:
        """Only a drawn bar needs a call after every step; without one the steps are counted from the
        model's own step counter, so Keras makes no per-step Python call for this callback."""
        return self._bar_wanted

    def _step(self) -> int:
        return int(self.model._train_counter.numpy())  # pylint: disable=protected-access  (Keras's step count)

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._first_step = time.time(), self._step()
        if self._bar_wanted:
            from tqdm import tqdm

            self._bar = tqdm(total=self.params.get("steps"), desc=f"{self._name} epoch {epoch + 1}/{self.params['epochs']}",
                             unit="step", leave=False, file=self._stream, dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        if self._bar is not None:
            self._bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        logs = logs or {}
        values = ", ".join(f"{name} {float(logs[name]):.4f}" for name in self._metrics if name in logs)
        steps = self._step() - self._first_step
        self._stream.write(f"  {self._name} epoch {epoch + 1}/{self.params['epochs']}: {steps} steps, "
                           f"{time.time() - self._start:.1f}s" + (f", {values}" if values else "") + "\n")
        self._stream.flush()
