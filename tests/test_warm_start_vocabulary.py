"""`models.trainers.warm_start` with `lookup: vocabulary` features: a base model whose vocabulary
ranks the ids otherwise is not used, even when the table sizes (the fingerprint) match, because its
row i belongs to another id; the same vocabulary warm-starts."""
import json
import os

import tensorflow as tf
from tfx.components.trainer.fn_args_utils import FnArgs

from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.models.trainers import warm_start
from cascade_ranking.schema import features as F


class _Model(tf.keras.Model):
    def __init__(self, spec):
        super().__init__()
        self.embedding = FeatureEmbedding(3, sparse_features=[spec], dense_features=[])

    def call(self, inputs):
        return tf.reduce_sum(self.embedding(inputs)["sku"], axis=-1)


def _model(tmp_path, name, words):
    path = tmp_path / name
    path.write_text("".join(f"{w}\n" for w in words))
    spec = F.SparseFeature("sku", len(words) + 1, dtype="string", lookup="vocabulary", vocabulary_file=str(path),
                           oov_buckets=1)
    model = _Model(spec)
    model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1), loss="mse")
    model.fit({"sku": tf.constant([["a"], ["b"]])}, tf.constant([1.0, 0.0]), verbose=0)
    return model


def _base(tmp_path, model):
    """A base Model artifact of `model` trained on span 1, as a Trainer saves it."""
    out = tmp_path / "base"
    warm_start.save(model, FnArgs(serving_model_dir=str(out / "Format-Serving"),
                                  custom_config={warm_start.WARM_START_KEY: json.dumps({"span": 1})}))
    return str(out / "Format-Serving")


def test_another_vocabulary_of_the_same_size_trains_afresh(tmp_path, capsys):
    base = _model(tmp_path, "v1", ["a", "b", "c"])
    info = json.load(open(os.path.join(os.path.dirname(_base(tmp_path, base)), warm_start.INFO_PATH)))
    assert set(info["vocabularies"]) == {"sku"}
    reranked = _model(tmp_path, "v2", ["b", "a", "c"])  # the next span's Transform: same size, other order
    assert warm_start.fingerprint(reranked) == info["fingerprint"]
    assert warm_start.vocabularies(reranked) != info["vocabularies"]
    fn_args = FnArgs(base_model=os.path.join(str(tmp_path / "base"), "Format-Serving"), custom_config={})
    assert not warm_start.restore(reranked, fn_args, "Trainer.x")
    assert "Trainer.x: trained afresh: the vocabularies of sku differ" in capsys.readouterr().out
    same = _model(tmp_path, "v3", ["a", "b", "c"])
    assert warm_start.vocabularies(same) == info["vocabularies"]
    assert warm_start.restore(same, fn_args, "Trainer.x")
    tf.debugging.assert_equal(same.embedding.tables["sku"].embeddings, base.embedding.tables["sku"].embeddings)
