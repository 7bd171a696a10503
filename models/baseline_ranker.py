"""Baseline ranking model: embeddings → MLP → logit (a plain DNN CTR model).

    logit = w·MLP(concat_f e_f) + b,   ctr = σ(logit)

The first end-to-end pipeline trains this model; it is also the "baseline DNN" row of the
ablations. The Factory Floor ranker (DCNv2, Q·U, rank loss, ...) builds on the same
`FeatureEmbedding` input layer.
"""
from typing import Dict

import tensorflow as tf

from cascade_ranking.models.config import TrainerConfig
from cascade_ranking.models.embedding import FeatureEmbedding
from cascade_ranking.schema import features as F


class BaselineRanker(tf.keras.Model):
    def __init__(self, config: TrainerConfig = TrainerConfig(), **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.embedding = FeatureEmbedding(config.embedding_dim)
        self.hidden = [tf.keras.layers.Dense(u, activation=config.activation) for u in config.hidden_units]
        self.logit = tf.keras.layers.Dense(1, name="logit")

    def get_config(self):
        return {"config": self.config.to_json()}

    @classmethod
    def from_config(cls, config):
        return cls(TrainerConfig.from_json(config["config"]))

    def call(self, features: Dict[str, tf.Tensor], training=None) -> tf.Tensor:
        embedded = self.embedding(features, training=training)
        x = tf.concat([embedded[name] for name in F.MODEL_INPUTS], axis=-1)
        for layer in self.hidden:
            x = layer(x)
        return self.logit(x)
