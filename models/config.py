"""The one codec of every configuration dataclass, and the baseline DNN's `TrainerConfig`.

Every config of the package (`PipelineConfig` and the stage, sampler, evaluator and data configs
it holds) is a dataclass with defaults. `to_dict` turns one into plain JSON/YAML values (tuples
become lists, nested configs dicts); `merge` applies a partial dict of such values to a config
(nested configs merge field by field, so a preset such as `RankerConfig.teacher()` keeps what the
dict does not name), checking each value against the field's type; `config_from_dict` builds a
config from its defaults. An unknown key or a value of the wrong type is a `ConfigError` naming its
dotted path (`ranker.epochs: expected an int, got 'three'`): a typo must not silently train the
defaults. Each dataclass's own `__post_init__`/`validate` checks its cross-field rules.
"""
import dataclasses
import json
import re
import typing
from typing import Any, Dict, Tuple, Type, TypeVar

# A number in exponent form without a dot (1e-06, 5E+3): a float in JSON and YAML 1.2, a string to PyYAML.
_YAML11_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value that is unknown or of the wrong type; the message names its dotted path."""


def to_dict(config) -> Dict[str, Any]:
    """A config dataclass as plain values: nested configs as dicts, tuples as lists; a dataclass
    may leave out fields at their defaults that do not apply to it (`omitted_fields()`, e.g. a
    hashed feature's vocabulary settings), which read back as those defaults."""
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            omitted = value.omitted_fields() if hasattr(value, "omitted_fields") else ()
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in omitted}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


def _coerce(value, annotation, where: str):
    """`value` (plain JSON/YAML) as the field type `annotation`, or a ConfigError naming `where`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):  # the first type the value fits
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(" or ".join(errors))
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return config_from_dict(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _YAML11_EXPONENT_FLOAT.match(value):
            value = float(value)  # YAML 1.1 (PyYAML) reads 1e-06, as JSON and Python write it, as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def merge(config: C, values: Dict[str, Any], where: str = "") -> C:
    """`config` with the fields named in `values` replaced (nested configs merged field by field),
    each value checked against its field's type. Raises ConfigError naming an unknown or ill-typed
    key by its dotted path; the dataclass's own checks run on the result."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or type(config).__name__}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - known)
    if unknown:
        path = f"{where}." if where else ""
        raise ConfigError(f"unknown {type(config).__name__} field(s) {', '.join(path + u for u in unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    changes = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        current = getattr(config, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[name] = merge(current, value, path)
        else:
            changes[name] = _coerce(value, hints[name], path)
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or type(config).__name__}: {e}") from None


def check_positive(config, *names: str) -> None:
    """Raises ValueError naming the first of the fields `names` of `config` that is not > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def config_from_dict(cls: Type[C], values: Dict[str, Any], where: str = "") -> C:
    """The dataclass `cls` with its defaults overridden by `values` (`merge`). A dataclass with
    required fields (a registry entry such as `schema.features.InputFeature`) is built from
    `values` alone, each checked against its field's type; a missing required field is a
    ConfigError naming it."""
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if not required:
        return merge(cls(), values, where)
    label = where or cls.__name__
    if not isinstance(values, dict):
        raise ConfigError(f"{label}: expected a mapping of {cls.__name__} fields, got {values!r}")
    known = {f.name for f in fields}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {', '.join(unknown)} in {label}; known: {', '.join(sorted(known))}")
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"{label}: {cls.__name__} needs {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    coerced = {name: _coerce(value, hints[name], f"{label}.{name}") for name, value in values.items()}
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{label}: {e}") from None


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
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainerConfig":
        return config_from_dict(cls, values)

    @classmethod
    def from_json(cls, text: str) -> "TrainerConfig":
        return cls.from_dict(json.loads(text))
