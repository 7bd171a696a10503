"""Configuration of the stage models: one dataclass per concern, every switch named, with defaults.

`TrainerConfig` travels to the TFX Trainer as JSON in `custom_config` (see `to_json`/`from_json`).
"""
import dataclasses
import json
from typing import Any, Dict, Tuple


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """How a stage model is built and trained."""

    stage: str = "ranking"
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainerConfig fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def from_json(cls, text: str) -> "TrainerConfig":
        return cls.from_dict(json.loads(text))
