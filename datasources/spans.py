"""Spans: an Examples directory that grows over time, in TFX's span convention.

A log that arrives day by day is written as one directory per span, each an Examples directory of
its own (Split-train/, Split-eval/):

    examples_dir/span-1/Split-train/*, span-1/Split-eval/*, span-2/…, span-3/…

TFX's file-based ExampleGen reads such a directory through the input patterns
`span-{SPAN}/Split-train/*` and `span-{SPAN}/Split-eval/*`: without a RangeConfig its driver takes
the newest span (the largest number), with `RangeConfig(static_range=…)` the span it names, and the
Examples artifact records the span it read (its `span` property). This module is the one place
that knows the layout: which spans a directory holds, which one a run reads, and the patterns and
RangeConfig that make ExampleGen read it. An examples_dir without span-*/ directories is one
Examples directory, read as it is (no span).
"""
import os
import re
from typing import Dict, Optional

from cascade_ranking.datasources.example_io import InputError

SPAN_DIR_PREFIX = "span-"
SPAN_DIR = SPAN_DIR_PREFIX + "{SPAN}"  # TFX's placeholder: ExampleGen's driver fills in the span number
_SPAN_NAME = re.compile(r"^span-(\d+)$")


def span_dir_name(span: int) -> str:
    return f"{SPAN_DIR_PREFIX}{span}"


def find_spans(examples_dir: str) -> Dict[int, str]:
    """span number → its directory, for every `span-<digits>/` directory in `examples_dir` (empty
    when it has none: one Examples directory without spans). Remote paths (gs://…) are not listed:
    empty."""
    if "://" in examples_dir or not os.path.isdir(examples_dir):
        return {}
    spans = {}
    for name in os.listdir(examples_dir):
        match = _SPAN_NAME.match(name)
        if match and os.path.isdir(os.path.join(examples_dir, name)):
            spans[int(match.group(1))] = os.path.join(examples_dir, name)
    return dict(sorted(spans.items()))


def chosen_span(examples_dir: str, span: Optional[int]) -> Optional[int]:
    """The span a run reads: `span` when given, else the newest of `examples_dir`; None when the
    directory has no spans. A span that is not there, or a span asked of a directory without spans,
    is an InputError naming the spans there are. A remote directory (gs://…) is not listed: it is
read as span `span` when one is named, else as one Examples directory."""
    if "://" in examples_dir:  # not listed: a remote directory is read with spans when one is named
        return span
    spans = find_spans(examples_dir)
    if not spans:
        if span is not None:
            raise InputError(f"span {span}: {examples_dir} has no {SPAN_DIR_PREFIX}<number>/ directories "
                             f"(it is read as one Examples directory); unset span")
        return None
    if span is None:
        return max(spans)
    if span not in spans:
        raise InputError(f"span {span} is not in {examples_dir}: it has span(s) {', '.join(map(str, spans))}")
    return span


def split_root(examples_dir: str, span: Optional[int]) -> str:
    """The directory holding Split-train/ and Split-eval/ of the run (`chosen_span`'s, or
    `examples_dir` itself without spans)."""
    chosen = chosen_span(examples_dir, span)
    return examples_dir if chosen is None else os.path.join(examples_dir, span_dir_name(chosen))


def split_pattern(split: str, spanned: bool) -> str:
    """ExampleGen's input pattern of a split, relative to examples_dir."""
    return f"{SPAN_DIR}/Split-{split}/*" if spanned else f"Split-{split}/*"


def range_config(span: Optional[int]):
    """ExampleGen's RangeConfig reading exactly `span`; None (the driver's default: the newest
    span) when no span is named."""
    if span is None:
        return None
    from tfx.proto import range_config_pb2

    return range_config_pb2.RangeConfig(
        static_range=range_config_pb2.StaticRange(start_span_number=span, end_span_number=span))


def window_range_config(first: int, last: int):
    """The RangeConfig of spans `first` … `last` (TFX's `SpanRangeStrategy` takes it: ExampleGen
    itself reads one span per run)."""
    from tfx.proto import range_config_pb2

    return range_config_pb2.RangeConfig(
        static_range=range_config_pb2.StaticRange(start_span_number=first, end_span_number=last))
