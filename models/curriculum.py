"""Curriculum for the auxiliary loss weights.

Anil et al., "On the Factory Floor: ML Engineering for Industrial-Scale Ads
Recommendation Models" (2022), §4.1.3: training starts on the logistic loss
alone, and the weights of the auxiliary losses (rank, distillation, and here
also the bias-constraint term of §7) are ramped up linearly:

```
ramp(step) = 0                                          if step < start_step
           = min(1, (step - start_step) / ramp_steps)   otherwise
             (= 1 from start_step on if ramp_steps == 0)
weight(step) = max_weight · ramp(step)
```

Written by hand (neither TFRS nor TF-Ranking has loss-weight schedules).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional

import tensorflow as tf


def linear_ramp(step, start_step: int = 0, ramp_steps: int = 0) -> tf.Tensor:
    """0 before `start_step`, linear to 1 over `ramp_steps` steps, then 1.

    Works on Python numbers and (graph) tensors; returns a float32 tensor.
    """
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}.")
    step = tf.cast(step, tf.float32)
    elapsed = step - float(start_step)
    if ramp_steps == 0:
        return tf.where(elapsed >= 0.0, tf.ones_like(step), tf.zeros_like(step))
    return tf.clip_by_value(elapsed / float(ramp_steps), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Ramp:
    """One loss weight: max_weight · linear_ramp(step, start_step, ramp_steps)."""
    max_weight: float = 0.0
    start_step: int = 0
    ramp_steps: int = 0

    def __call__(self, step) -> tf.Tensor:
        return self.max_weight * linear_ramp(step, self.start_step, self.ramp_steps)


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """Ramps for the rank, distillation and bias-constraint weights.

    The logistic loss always has weight 1 and is not scheduled. A weight whose
    `max_weight` is 0 switches its loss off.
    """
    rank: Ramp = dataclasses.field(default_factory=Ramp)
    distillation: Ramp = dataclasses.field(default_factory=Ramp)
    bias_constraint: Ramp = dataclasses.field(default_factory=Ramp)

    def weights(self, step) -> Dict[str, tf.Tensor]:
        """{'rank', 'distillation', 'bias_constraint'} -> weight at `step`."""
        return {
            "rank": self.rank(step),
            "distillation": self.distillation(step),
            "bias_constraint": self.bias_constraint(step),
        }

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]]) -> "Curriculum":
        """Builds from e.g. {'rank': {'max_weight': 0.5, 'ramp_steps': 1000}}."""
        config = dict(config or {})
        unknown = set(config) - {"rank", "distillation", "bias_constraint"}
        if unknown:
            raise ValueError(f"Unknown curriculum entries: {sorted(unknown)}.")
        return cls(**{k: Ramp(**v) for k, v in config.items()})

    def to_config(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)
