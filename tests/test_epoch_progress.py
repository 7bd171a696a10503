"""models/trainers/epoch_progress.py: one short line per epoch; a tqdm bar only when asked or on a terminal."""
import io
import re

import numpy as np
import tensorflow as tf

from cascade_ranking.models.trainers.epoch_progress import EpochProgress


def _fit(progress, epochs=2):
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    x, y = np.ones((40, 3), np.float32), np.zeros((40, 1), np.float32)
    return model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[progress])


def test_each_epoch_prints_one_line_with_its_steps_time_and_the_chosen_metrics():
    stream = io.StringIO()  # not a terminal: no bar, and so no Python call after every step
    progress = EpochProgress("toy", ("loss", "mae", "absent"), stream=stream)
    assert not progress._implements_train_batch_hooks()
    history = _fit(progress)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    for epoch, line in enumerate(lines):
        match = re.fullmatch(r"  toy epoch (\d)/2: (\d+) steps, [\d.]+s, loss ([\d.]+), mae ([\d.]+)", line)
        assert match, line
        assert int(match.group(1)) == epoch + 1 and int(match.group(2)) == 5  # 40 rows / 8
        assert float(match.group(3)) == round(history.history["loss"][epoch], 4)
        assert float(match.group(4)) == round(history.history["mae"][epoch], 4)


def test_the_bar_counts_the_steps_and_leaves_only_the_epoch_lines():
    stream = io.StringIO()
    _fit(EpochProgress("toy", stream=stream, bar=True), epochs=1)
    text = stream.getvalue()
    assert re.search(r"toy epoch 1/1: +\d+%\|.*\| [0-5]/5 \[", text)  # tqdm's bar over the 5 steps (it redraws at most
    # every 0.1 s, so the last count it drew depends on the machine)
    assert text.rstrip().splitlines()[-1].startswith("  toy epoch 1/1: 5 steps, ")
