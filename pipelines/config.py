"""PipelineConfig: the one configuration object of a pipeline run, every switch named with a default."""
import dataclasses
import os
from typing import List, Optional, Tuple

from datasources.synthetic import SyntheticConfig
from models.ranker_config import RankerConfig

SOURCES = ("synthetic", "examples")
BEAM_MODES = ("in_process", "in_memory", "multi_processing")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Where the pipeline reads, where it writes, and how each component is configured."""

    pipeline_name: str = "cascade-ranking"
    output_dir: str = "cascade_output"
    # Data source: "synthetic" (built-in generator) or "examples" (an Examples directory with
    # Split-train/ and Split-eval/ of candidate rows, e.g. from `cascade convert` or `cascade generate`).
    source: str = "synthetic"
    examples_dir: Optional[str] = None
    synthetic: SyntheticConfig = SyntheticConfig()
    ranker: RankerConfig = RankerConfig()  # the ranking stage (Factory Floor ranker)
    # Beam: "in_process" passes no Beam args (fastest for small data); "multi_processing" runs
    # DirectRunner with one worker per core.
    beam_mode: str = "in_process"
    beam_workers: int = 0  # 0 = one per core
    enable_cache: bool = True
    # Where ImportSchemaGen finds schema.pbtxt (default: this package's schema/); a Kubeflow run
    # names the path inside the container image or a gs:// copy.
    schema_file: Optional[str] = None
    # Beam args used as they are instead of the beam_mode ones (e.g. DataflowRunner flags).
    beam_args_override: Tuple[str, ...] = ()

    @property
    def pipeline_root(self) -> str:
        return os.path.join(self.output_dir, "pipeline_root")

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.output_dir, "metadata.sqlite")

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.output_dir, "serving")

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "examples":
            if not self.examples_dir:
                raise ValueError("source 'examples' needs examples_dir")
            for split in ("train", "eval") if "://" not in self.examples_dir else ():
                path = os.path.join(self.examples_dir, f"Split-{split}")
                if not os.path.isdir(path):
                    raise FileNotFoundError(f"data path {path} does not exist")
        if self.source == "synthetic":
            self.synthetic.validate()
        if self.beam_mode not in BEAM_MODES:
            raise ValueError(f"unknown beam_mode {self.beam_mode!r}; choose one of {', '.join(BEAM_MODES)}")

    def beam_pipeline_args(self) -> List[str]:
        if self.beam_args_override:
            return list(self.beam_args_override)
        if self.beam_mode == "in_process":
            return []
        if self.beam_mode == "in_memory":
            return ["--direct_running_mode=in_memory"]
        workers = self.beam_workers or os.cpu_count() or 1
        return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
