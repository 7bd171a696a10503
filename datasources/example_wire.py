"""Vectorised tf.train.Example serializer for columnar data (numpy, no per-row Python protos).

Written by hand because the libraries lack it: building `tf.train.Example` protos in Python costs
tens of µs a row, and tfx_bsl's C++ `RecordBatchToExamplesEncoder`, though fast, writes a proto
map's entries in an order that changes from process to process, so its bytes are not reproducible
(re-parsing and re-serializing each row with `deterministic=True` cost more than the encoding).

This module writes the protobuf wire format directly, for many rows at once, with the same bytes
as `Example.SerializeToString(deterministic=True)` (map entries sorted by key; a map entry always
holds its key and value; an empty packed list is omitted). The layout:

    Example        = 0x0A len(Features) Features
    Features       = for each feature name, sorted: 0x0A len(Entry) Entry
    Entry          = 0x0A len(name) name  0x12 len(Feature) Feature
    Feature        = 0x0A len(L) BytesList | 0x12 len(L) FloatList | 0x1A len(L) Int64List
    Int64List      = 0x0A len(P) P, P = the values as varints      (absent when the list is empty)
    FloatList      = 0x0A len(P) P, P = the values as float32 LE   (absent when the list is empty)
    BytesList      = for each value: 0x0A len(v) v

Every byte string here is a "ragged" array: (flat uint8 array, one length per row), so each level
of nesting is a handful of numpy operations over all rows. `tests/test_example_wire.py` checks the
bytes against protobuf's own deterministic serialization.
"""
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

Ragged = Tuple[np.ndarray, np.ndarray]  # (flat uint8 bytes, length of each row's piece)

_KIND_TAGS = {"bytes": 0x0A, "float": 0x12, "int64": 0x1A}


class Column:
    """One feature over many rows: its kind, its values flattened in row order, and how many
    values each row has."""

    __slots__ = ("kind", "values", "counts")

    def __init__(self, kind: str, values, counts: np.ndarray):
        if kind not in _KIND_TAGS:
            raise ValueError(f"unknown feature kind {kind!r}; choose one of {sorted(_KIND_TAGS)}")
        self.kind, self.values, self.counts = kind, values, np.asarray(counts, dtype=np.int64)


def dense_column(values: np.ndarray) -> Column:
    """A column of one value ([n] array) or k values ([n, k] array) per row. int/bool → int64,
    float → float (written as float32), object/bytes → bytes."""
    values = np.asarray(values)
    n = values.shape[0]
    width = 1 if values.ndim == 1 else int(np.prod(values.shape[1:]))
    flat = values.reshape(-1)
    if values.dtype.kind in "iub":
        kind = "int64"
    elif values.dtype.kind == "f":
        kind = "float"
    elif values.dtype.kind in "OS":
        kind, flat = "bytes", list(flat)
    else:
        raise ValueError(f"cannot write a column of dtype {values.dtype}")
    return Column(kind, flat, np.full(n, width, dtype=np.int64))


def ragged_int64_column(rows: Sequence[np.ndarray]) -> Column:
    """A column of int64 lists of any length, one per row."""
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.concatenate(rows).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    return Column("int64", flat, counts)


def _varints(values: np.ndarray) -> Ragged:
    """Protobuf varints of int64 values (a negative value takes 10 bytes, as protobuf writes it)."""
    v = np.asarray(values, dtype=np.int64).view(np.uint64)
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * k))
    starts = np.cumsum(nbytes) - nbytes
    owner = np.repeat(np.arange(v.size), nbytes)
    j = np.arange(owner.size, dtype=np.int64) - starts[owner]
    byte = (v[owner] >> (7 * j).astype(np.uint64)) & np.uint64(0x7F)
    more = j < nbytes[owner] - 1
    return (byte | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8), nbytes


def _sum_per_row(piece_lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row totals of per-value lengths, where row r owns the next counts[r] values."""
    cumulative = np.concatenate([[0], np.cumsum(piece_lengths)]).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return cumulative[bounds[1:]] - cumulative[bounds[:-1]]


def _concat_rows(*pieces: Ragged) -> Ragged:
    """Row-wise concatenation: row r of the result is row r of each piece, in order."""
    lengths = np.stack([p[1] for p in pieces])  # [pieces, rows]
    row_lengths = lengths.sum(axis=0)
    row_starts = np.cumsum(row_lengths) - row_lengths
    within = np.cumsum(lengths, axis=0) - lengths  # offset of each piece inside its row
    out = np.empty(int(row_lengths.sum()), dtype=np.uint8)
    for (flat, piece_lengths), offset in zip(pieces, within):
        if flat.size == 0:
            continue
        src_starts = np.cumsum(piece_lengths) - piece_lengths
        dest = np.repeat(row_starts + offset - src_starts, piece_lengths) + np.arange(flat.size)
        out[dest] = flat
    return out, row_lengths


def _constant(data: bytes, rows: int) -> Ragged:
    return np.tile(np.frombuffer(data, dtype=np.uint8), rows), np.full(rows, len(data), dtype=np.int64)


def _length_delimited(tag: int, body: Ragged, omit_empty: bool = False) -> Ragged:
    """`tag varint(len) body` per row (a length-delimited field); rows with an empty body give
    nothing when `omit_empty` (a packed repeated field with no values is not written)."""
    rows = body[1].size
    prefix_flat, prefix_lengths = _varints(body[1])
    tagged = _concat_rows(_constant(bytes([tag]), rows), (prefix_flat, prefix_lengths), body)
    if not omit_empty or body[1].all():
        return tagged
    keep = body[1] > 0
    return tagged[0][np.repeat(keep, tagged[1])], np.where(keep, tagged[1], 0)


def _list_payload(column: Column) -> Ragged:
    """The Int64List / FloatList / BytesList message of each row."""
    counts = column.counts
    if column.kind == "int64":
        flat, lengths = _varints(column.values)
        return _length_delimited(0x0A, (flat, _sum_per_row(lengths, counts)), omit_empty=True)
    if column.kind == "float":
        flat = np.ascontiguousarray(column.values, dtype="<f4").view(np.uint8)
        return _length_delimited(0x0A, (flat, counts * 4), omit_empty=True)
    values = [bytes(v) for v in column.values]
    value_lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    flat = np.frombuffer(b"".join(values), dtype=np.uint8)
    each = _length_delimited(0x0A, (flat, value_lengths))  # one field per value
    return each[0], _sum_per_row(each[1], counts)


def serialize_columns(columns: Mapping[str, Column]) -> List[bytes]:
    """The serialized tf.train.Example of each row, byte-identical to
    `Example.SerializeToString(deterministic=True)` of the same features."""
    if not columns:
        raise ValueError("no columns to serialize")
    rows = {name: c.counts.size for name, c in columns.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"columns have different row counts: {rows}")
    n = next(iter(rows.values()))
    entries = []
    for name in sorted(columns):
        column = columns[name]
        key = name.encode()
        feature = _length_delimited(_KIND_TAGS[column.kind], _list_payload(column))
        entry_body = _concat_rows(_constant(b"\x0A" + _varint_bytes(len(key)) + key, n),
                                  _length_delimited(0x12, feature))
        entries.append(_length_delimited(0x0A, entry_body))
    example = _length_delimited(0x0A, _concat_rows(*entries))
    data = example[0].tobytes()
    ends = np.cumsum(example[1]).tolist()
    starts = [0] + ends[:-1]
    return [data[a:b] for a, b in zip(starts, ends)]


def _varint_bytes(value: int) -> bytes:
    flat, _ = _varints(np.array([value]))
    return flat.tobytes()


def columns_from_arrays(arrays: Mapping[str, Union[np.ndarray, Sequence[np.ndarray]]]) -> Dict[str, Column]:
    """Columns from numpy arrays ([n] or [n, k]) and lists of per-row int arrays (ragged)."""
    return {name: ragged_int64_column(a) if isinstance(a, list) else dense_column(a) for name, a in arrays.items()}
