"""The vectorised tf.Example writer gives protobuf's own deterministic bytes."""
import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.datasources import example_wire as wire


def _reference(rows):
    """Each row built as a tf.train.Example in Python and serialized by protobuf itself."""
    out = []
    for row in rows:
        example = tf.train.Example()
        for name, (kind, values) in row.items():
            feature = example.features.feature[name]
            if kind == "int64":
                feature.int64_list.value.extend(int(v) for v in values)
            elif kind == "float":
                feature.float_list.value.extend(float(v) for v in values)
            else:
                feature.bytes_list.value.extend(values)
        out.append(example.SerializeToString(deterministic=True))
    return out


def test_bytes_equal_protobufs_deterministic_serialization_for_every_kind_and_edge():
    rng = np.random.default_rng(3)
    n = 40
    big = np.array([0, 1, 127, 128, 16_383, 16_384, 2**31, 2**62, -1, -(2**63), 2**63 - 1])
    scalar_ints = rng.choice(big, size=n)
    ragged = [rng.choice(big, size=int(rng.integers(0, 4))) for _ in range(n)]  # includes empty lists
    floats = rng.normal(size=(n, 3)).astype(np.float32)
    floats[0] = [np.inf, -np.inf, -0.0]
    words = np.array([b"", b"a", b"x" * 200, "é".encode()], dtype=object)[rng.integers(0, 4, size=n)]
    columns = {
        "scalar": wire.dense_column(scalar_ints),
        "ids": wire.ragged_int64_column(ragged),
        "dense": wire.dense_column(floats),
        "word": wire.dense_column(words),
        # a name longer than 127 bytes needs a 2-byte length; names are written sorted
        "a" * 130: wire.dense_column(np.arange(n) % 2 == 0),
    }
    rows = [{
        "scalar": ("int64", [scalar_ints[i]]),
        "ids": ("int64", list(ragged[i])),
        "dense": ("float", list(floats[i])),
        "word": ("bytes", [words[i]]),
        "a" * 130: ("int64", [int(i % 2 == 0)]),
    } for i in range(n)]
    written = wire.serialize_columns(columns)
    assert written == _reference(rows)
    parsed = tf.train.Example.FromString(written[5])
    assert list(parsed.features.feature["ids"].int64_list.value) == [int(v) for v in ragged[5]]


def test_a_row_of_only_empty_lists_is_still_a_valid_example():
    columns = {"ids": wire.ragged_int64_column([np.zeros(0, np.int64), np.array([7])])}
    assert wire.serialize_columns(columns) == _reference([{"ids": ("int64", [])}, {"ids": ("int64", [7])}])


def test_bad_columns_are_refused_by_name():
    with pytest.raises(ValueError, match="different row counts"):
        wire.serialize_columns({"a": wire.dense_column(np.zeros(2)), "b": wire.dense_column(np.zeros(3))})
    with pytest.raises(ValueError, match="dtype"):
        wire.dense_column(np.array(["2026-01-01"], dtype="datetime64[D]"))
    with pytest.raises(ValueError, match="no columns"):
        wire.serialize_columns({})
