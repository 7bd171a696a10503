"""Configuration of the stage models: one dataclass per concern, every switch named, with defaults.

`TrainerConfig` (the baseline DNN) travels to the TFX Trainer as JSON in `custom_config` (see
`to_json`/`from_json`); `config_from_dict` builds any config dataclass from such JSON.
"""
import dataclasses
import json
from typing import Any, Dict, Tuple, Type, TypeVar

C = TypeVar("C")


def config_from_dict(cls: Type[C], values: Dict[str, Any]) -> C:
    """The dataclass `cls` with its defaults overridden by `values` (JSON lists become tuples).
    An unknown key is an error: a typo must not silently train the defaults."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How the baseline DNN is built and trained."""

    embedding_dim: int = 16
    hidden_units: Tuple[int, ...] = (256, 128)
    activation: str = "relu"
    optimizer: str = "adam"
    learning_rate: float = 2e-3
    batch_size: int = 512
    epochs: int = 1  # one pass, as in production CTR training: id embeddings overfit on a second pass
    shuffle_seed: int = 0
    exposed_only: bool = True  # the ranker learns CTR from shown candidates (ui_position > 0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainerConfig":
        return config_from_dict(cls, values)

    @classmethod
    def from_json(cls, text: str) -> "TrainerConfig":
        return cls.from_dict(json.loads(text))
