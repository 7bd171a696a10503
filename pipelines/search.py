"""`cascade search`: the width search of the ranking stage (`models.width_search`, Factory Floor
§3.2) on a run's data, once per cost target.

It reads the PipelineConfig that `cascade run` would (the same `--config`, `--set` and data
flags), searches `PipelineConfig.ranker` on the shown rows of the run's train split with the
registry's features (`features`; the label is `keys.click`, > 0 a click) and scores the result on
the eval split. Synthetic data (`--source synthetic`) is first generated into a temporary directory
(`datasources.synthetic.write_dataset`, the run's `synthetic` settings), removed afterwards; an
Examples directory is read where it is (the run's span of a directory of spans; a `span_window`
is not applied: the search reads the one span).

Written into the output directory, per target T (named by `target_name`, e.g. 0.9):
    ranker-T.yaml    the whole effective PipelineConfig (what `cascade config --show` prints for
                     the same flags) with the ranker's searched fields replaced, headed by comments
                     naming them: `cascade run --config ranker-T.yaml` trains the searched ranker
                     on the same data with every other setting of the search's run;
    search-T.json    the architecture, its cost ratio and FLOPs, the default's, the final reward,
                     the super-network's eval log loss at the architecture and at the default
                     widths, the controller's last probabilities and the reward trace;
and summary.json (every target's result without the traces). The library log goes to
logs/run.log (`pipelines.run_log.RunLog`), as for `cascade run`.
"""
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

MAX_COST_TARGET = 1.5
SUMMARY_FILE = "summary.json"


def parse_cost_targets(text: str) -> Tuple[float, ...]:
    """"0.85,0.9,0.95" as (0.85, 0.9, 0.95): each in (0, MAX_COST_TARGET], no repeats; a ValueError
    naming the bad entry otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"expected comma-separated cost targets such as 0.85,0.9,0.95, got {text!r}")
    targets = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"cost target {part!r} is not a number (expected e.g. 0.85,0.9,0.95)") from None
        if not 0.0 < value <= MAX_COST_TARGET:
            raise ValueError(f"cost target {part} is outside (0, {MAX_COST_TARGET:g}]: it is a fraction of the "
                             f"default ranker's FLOPs, e.g. 0.9")
        if value in targets:
            raise ValueError(f"cost target {part} is given twice")
        targets.append(value)
    return tuple(targets)


def target_name(target: float) -> str:
    return f"{target:g}"


def _split_files(config, workdir: str) -> Tuple[str, str]:
    """(train dir, eval dir) of the run's data; synthetic data is written under `workdir`."""
    if config.source == "synthetic":
        from cascade_ranking.datasources import synthetic

        root = os.path.join(workdir, "examples")
        synthetic.write_dataset(config.synthetic, root)
    else:
        root = config.split_root()
    return os.path.join(root, "Split-train"), os.path.join(root, "Split-eval")


def run(config, targets: Sequence[float], search_config=None, progress: Callable[[str], None] = print,
        workdir: Optional[str] = None) -> List:
    """One `width_search.search` of `config.ranker` per target on the run's data; returns the
    SearchResults in the order of `targets`. `progress` gets the console lines."""
    from cascade_ranking.models import inputs, width_search
    from cascade_ranking.schema import features as F

    search_config = search_config or width_search.SearchConfig()
    schema = config.local_schema() or F.load_schema()
    spec = F.training_parse_spec(schema)
    label = config.keys.click
    if label not in spec:
        raise ValueError(f"the schema has no label column {label!r} (keys.click)")
    owned = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="cascade-search-")
    try:
        if config.source == "synthetic":
            progress(f"generating {config.synthetic.num_requests} synthetic requests (seed {config.synthetic.seed}) "
                     f"into a temporary directory")
        train_dir, eval_dir = _split_files(config, workdir)
        cache = inputs.cache_fits([train_dir], config.ranker.cache_train_mb)
        train = inputs.shown_row_batches([train_dir], search_config.batch_size, parse_spec=spec,
                                         shuffle_seed=search_config.seed, cache=cache)
        held_out = inputs.shown_row_batches([eval_dir], 1024, parse_spec=spec)
        space = width_search.SearchSpace(config.ranker, search_config)
        cost = width_search.CostModel(config.ranker, config.features, search_config.cost)
        progress(f"search space: {', '.join(f'{d.name} {list(d.choices)}' for d in space.decisions)} "
                 f"({space.num_architectures} architectures); default {search_config.cost} FLOPs {cost.full_flops:,}")
        results = []
        for target in targets:
            sc = search_config.replace(cost_target=float(target))
            closest = width_search.closest_ratio(space, cost, sc.cost_target)
            progress(f"target {target_name(target)}: {sc.steps} steps ({sc.warmup_steps} warm-up), γ {sc.gamma:g}; "
                     f"the closest architecture costs {closest:.3f}")

            def report(info, name=target_name(target)):
                arch = info["most_likely"]
                state = "warm-up, uniform" if info["warmup"] else (
                    f"most likely {_arch_text(arch)} (cost {info['most_likely_cost_ratio']:.3f})")
                progress(f"  {name}: step {info['step']}/{info['steps']}  loss {info['mean_loss']:.4f}  "
                         f"reward {info['mean_reward']:.4f}  {state}")

            results.append(width_search.search(config.ranker, train, held_out, sc, features=config.features,
                                               label_key=label, progress=report, log_every=max(1, sc.steps // 5)))
        return results
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)


def _arch_text(arch) -> str:
    return (f"embedding_dim {arch.embedding_dim}, hidden_units {list(arch.hidden_units)}, "
            f"cross_projection_dim {arch.cross_projection_dim}")


def ranker_yaml(config, result) -> str:
    """The ranker-T.yaml text: comments naming the searched fields, then the whole PipelineConfig
    with `ranker` replaced by the searched one (`pipelines.config.load_config` reads it back)."""
    from cascade_ranking.pipelines.config import dump_config

    base = result.base_config.to_dict()
    header = [f"# cascade search, cost target {target_name(result.search_config.cost_target)}: the ranker at "
              f"{result.cost_ratio:.3f} × the default's {result.search_config.cost} FLOPs "
              f"({result.flops:,} vs {result.full_flops:,})"]
    for name, value in result.architecture.to_dict().items():
        mark = "" if value != base[name] else " (unchanged)"
        header.append(f"#   ranker.{name}: {json.dumps(base[name])} -> {json.dumps(value)}{mark}")
    header.append("# run it: cascade run --config <this file>")
    return "\n".join(header) + "\n" + dump_config(config.replace(ranker=result.ranker_config()))


def write_results(config, results: Sequence, out_dir: str) -> Dict[str, str]:
    """Writes ranker-T.yaml and search-T.json per result and summary.json; returns their paths by name."""
    os.makedirs(out_dir, exist_ok=True)
    paths, summary = {}, []
    for result in results:
        name = target_name(result.search_config.cost_target)
        yaml_path = os.path.join(out_dir, f"ranker-{name}.yaml")
        with open(yaml_path, "w") as f:
            f.write(ranker_yaml(config, result))
        record = result.to_dict()
        summary.append({**record, "config_file": os.path.basename(yaml_path)})
        json_path = os.path.join(out_dir, f"search-{name}.json")
        with open(json_path, "w") as f:
            json.dump({**record, "trace": result.trace}, f, indent=1)
        paths[f"ranker-{name}.yaml"], paths[f"search-{name}.json"] = yaml_path, json_path
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    with open(summary_path, "w") as f:
        json.dump({"ranker": results[0].base_config.to_dict() if results else None, "results": summary}, f, indent=2)
    paths[SUMMARY_FILE] = summary_path
    return paths


def format_table(results: Sequence) -> str:
    """The console table: one row per target, then the default widths (eval log loss of the
    super-network at the default, from the first search)."""
    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    rows = [("target", "embedding_dim", "hidden_units", "cross_projection_dim", "cost ratio", "FLOPs/candidate",
             "eval log loss", "final reward")]
    for r in results:
        a = r.architecture
        rows.append((target_name(r.search_config.cost_target), str(a.embedding_dim), str(list(a.hidden_units)),
                     str(a.cross_projection_dim), f"{r.cost_ratio:.3f}", f"{r.flops:,}", loss(r.eval_log_loss),
                     f"{r.final_reward:.4f}"))
    if results:
        first = results[0]
        d = first.space.architecture(first.space.largest())
        rows.append(("default", str(d.embedding_dim), str(list(d.hidden_units)), str(d.cross_projection_dim), "1.000",
                     f"{first.full_flops:,}", loss(first.full_eval_log_loss), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
