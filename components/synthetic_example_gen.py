"""SyntheticExampleGen: a TFX ExampleGen whose source is the synthetic cascade-log generator.

Built on TFX's own ExampleGen machinery: `QueryBasedExampleGen` (component, driver, split
handling, payload format) with a `BaseExampleGenExecutor` whose input transform generates
requests instead of reading them. Each input split's "query" is a JSON object holding the
generator config and the split it selects; a request belongs to a split by a hash of its id
(`datasources.synthetic.request_split`, the same rule as `cascade generate`), so all candidates of
a request land in one split and the output is the same on any runner and worker count.
"""
import dataclasses
import json
from typing import Dict, Iterator, Sequence, Tuple

import apache_beam as beam
from tfx.components.example_gen import base_example_gen_executor
from tfx.components.example_gen.component import QueryBasedExampleGen
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2

from cascade_ranking.datasources import synthetic
from cascade_ranking.models.config import config_from_dict

DEFAULT_SPLITS: Tuple[Tuple[str, int], ...] = (("train", 4), ("eval", 1))
REQUESTS_PER_SHARD = 250


def encode_query(config: synthetic.SyntheticConfig, split: str, split_buckets: Sequence[Tuple[str, int]]) -> str:
    return json.dumps(
        {"config": dataclasses.asdict(config), "split": split, "split_buckets": [list(b) for b in split_buckets]},
        sort_keys=True,
    )


def decode_query(query: str) -> Tuple[synthetic.SyntheticConfig, str, Tuple[Tuple[str, int], ...]]:
    q = json.loads(query)
    return config_from_dict(synthetic.SyntheticConfig, q["config"]), q["split"], tuple((n, int(b)) for n, b in q["split_buckets"])


class _GenerateShard(beam.DoFn):
    """Generates the requests of one shard that fall in the selected split."""

    def __init__(self, config: synthetic.SyntheticConfig, split: str, split_buckets):
        self._config = config
        self._split = split
        self._split_buckets = split_buckets
        self._world = None
        self._encoder = None
        self._requests = beam.metrics.Metrics.counter("synthetic_example_gen", f"requests_{split}")
        self._rows = beam.metrics.Metrics.counter("synthetic_example_gen", f"rows_{split}")

    def setup(self):
        self._world = synthetic.World(self._config)
        self._encoder = synthetic.RequestEncoder()

    def process(self, shard: Tuple[int, int]) -> Iterator[bytes]:
        for r in range(*shard):
            if synthetic.request_split(r, self._split_buckets) != self._split:
                continue
            self._requests.inc()
            rows = self._encoder.encode(synthetic.generate_request(self._world, r))
            self._rows.inc(len(rows))
            yield from rows


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(bytes)
def _SyntheticToExample(pipeline: beam.Pipeline, exec_properties: Dict, split_pattern: str) -> beam.PCollection:
    del exec_properties
    config, split, split_buckets = decode_query(split_pattern)
    config.validate()
    shards = [(s, min(s + REQUESTS_PER_SHARD, config.num_requests)) for s in range(0, config.num_requests, REQUESTS_PER_SHARD)]
    return (
        pipeline
        | "Shards" >> beam.Create(shards)
        | "Distribute" >> beam.Reshuffle()
        | "Generate" >> beam.ParDo(_GenerateShard(config, split, split_buckets))
    )


class Executor(base_example_gen_executor.BaseExampleGenExecutor):
    """Generic ExampleGen executor whose input source is the synthetic generator."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _SyntheticToExample


class SyntheticExampleGen(QueryBasedExampleGen):
    """Outputs an Examples artifact of synthetic candidate rows with train/eval splits."""

    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(
        self,
        config: synthetic.SyntheticConfig = synthetic.SyntheticConfig(),
        split_buckets: Sequence[Tuple[str, int]] = DEFAULT_SPLITS,
    ):
        config.validate()
        input_config = example_gen_pb2.Input(
            splits=[
                example_gen_pb2.Input.Split(name=name, pattern=encode_query(config, name, split_buckets))
                for name, _ in split_buckets
            ]
        )
        super().__init__(input_config=input_config, output_config=example_gen_pb2.Output())
