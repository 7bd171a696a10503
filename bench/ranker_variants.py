"""Benchmark: how the ranking stage is trained, on a pipeline run's own inputs (DESIGN §11 "each
stage is trained for what it does in serving"; issue "the pipeline does what its parts promise").

    .venv/bin/python bench/ranker_variants.py --run cascade_output [--seeds 0,1,2]
        [--variants joint_tower,joint_reference_ui,joint_head,survivors] [--json out.json]

Inputs are those of the run's `Trainer.cascade` (`pipeline_inputs`: the NegativeSampler's request
lists of the run, read from its MLMD) and the run's retrieval model (`Trainer.retrieval`), so every
variant trains on what the pipeline's joint Trainer trains on; a test checks it
(tests/test_pipeline_e2e.py). Every variant trains the pipeline's own classes with the Trainer's
settings (`CascadeTrainerConfig()`, the ranker `RankerConfig.cascade_stage()` unless the variant
says otherwise), for the same epochs, and is scored on the run's eval lists restricted to the
logged candidates (the 50 of each request: random negatives left out), with the run's retrieval
model as the first stage and the quotas 40 → 30 → 20, as the CascadeEvaluator does:

    joint_tower         the pipeline: light pre-ranker + Factory Floor ranker in one network (LCRON),
                        the ranker's cascade score from its own DCN tower on the shared embeddings,
                        embedding_lr_multiplier 3 (`RankerConfig.cascade_stage()`)
    joint_reference_ui  the same network, the cascade score = the ranker's CTR logit at a reference
                        UI treatment (position 1, format 0), embeddings at the base learning rate
    joint_head          the same network, the cascade score = an MLP head on the ranker's quality body
    survivors           two steps instead of one network: the light pre-ranker trained alone (LCRON,
                        one stage), then the ranker trained alone on the lists cut to the pre-ranker's
                        top 30 of each (LCRON on its cascade score + its own losses on the shown
                        rows that survive)

Figures per variant, mean ± sample std over the seeds: e2e recall; the ranker's and the
pre-ranker's Recall@|GT|@20, each alone over the whole request (the issue's goal: the ranker's must
not be below the pre-ranker's); the ranker's CTR on the shown eval rows (AUC, NE, Σŷ/Σy); train
seconds. Dataset: whatever the run trained on (the demo: synthetic, `SyntheticConfig()`).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from report import mean_std  # noqa: E402  (sample std over seeds, as in BENCHMARKS.md)
from cascade_ranking.models import list_inputs as LI  # noqa: E402
from cascade_ranking.models import metrics  # noqa: E402
from cascade_ranking.models.cascade_model import CascadeModel, cascade_labels  # noqa: E402
from cascade_ranking.models.ranker import FactoryFloorRanker  # noqa: E402
from cascade_ranking.models.ranker_config import RankerConfig  # noqa: E402
from cascade_ranking.models.ranking_stage import RankingStage  # noqa: E402
from cascade_ranking.models.trainers import cascade as cascade_trainer  # noqa: E402
from cascade_ranking.models.trainers.list_data import candidate_examples, load_lists  # noqa: E402
from cascade_ranking.pipelines.config import PipelineConfig  # noqa: E402
from cascade_ranking.schema import request_list as RL  # noqa: E402

VARIANTS = {
    "joint_tower": RankerConfig.cascade_stage(),
    "joint_reference_ui": RankerConfig(),
    "joint_head": RankerConfig(cascade_score="head"),
    "survivors": RankerConfig.cascade_stage(),
}
QUOTAS = (40, 30, 20)


def pipeline_inputs(run_dir: str):
    """(train files, eval files, retrieval SavedModel dir) that the run's Trainer.cascade and
    Trainer.retrieval used: the newest artifacts of the run's MLMD store."""
    from cascade_ranking.pipelines.report import _store, latest_output

    config = PipelineConfig(output_dir=run_dir)
    store = _store(config)
    lists = latest_output(store, f"{config.pipeline_name}.NegativeSampler", "request_lists")
    retrieval = latest_output(store, f"{config.pipeline_name}.Trainer.retrieval", "model")
    if lists is None or retrieval is None:
        raise SystemExit(f"{run_dir} has no NegativeSampler request lists or retrieval model: run `cascade run` first")
    split = lambda name: [os.path.join(lists.uri, f"Split-{name}", "*")]  # noqa: E731
    return split("train"), split("eval"), os.path.join(retrieval.uri, "Format-Serving")


def retrieval_scores(model_dir: str, lists, mask) -> np.ndarray:
    """[R, L] u·v of the run's retrieval model for every logged candidate (−inf elsewhere)."""
    score = tf.saved_model.load(model_dir).signatures["score"]
    rows, slots = np.nonzero(mask)
    examples = candidate_examples({**lists, "mask": mask.astype(np.int64)}, count=len(rows))
    out = np.concatenate([score(examples=tf.constant(examples[k:k + 4096]))["score"].numpy()
                          for k in range(0, len(examples), 4096)])
    grid = np.full(mask.shape, -np.inf)
    grid[rows, slots] = out  # candidate_examples walks the real slots in np.nonzero order
    return grid


def fit(model: CascadeModel, train_files, config, lists_in_memory=None):
    """Adapts, compiles and fits like the Trainer (EMA of the ranker written in at the end)."""
    model.adapt(lists_in_memory if lists_in_memory is not None else load_lists(train_files, LI.list_size_in(train_files)))
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    data = (LI.dataset_from_lists(lists_in_memory, config.batch_size, shuffle_seed=config.seed)
            if lists_in_memory is not None else
            LI.request_list_dataset(train_files, config.batch_size, LI.list_size_in(train_files), shuffle_seed=config.seed))
    callbacks = [cascade_trainer.FinalizeRanker(model.ranking_stage)] if model.ranking_stage is not None else []
    model.fit(data, epochs=config.epochs, verbose=0, callbacks=callbacks)
    return model


def top_k_mask(scores: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The real slots among the top k of each list by score."""
    order = np.argsort(-np.where(mask, scores, -np.inf), axis=1, kind="stable")[:, :k]
    keep = np.zeros_like(mask, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep & mask


def train_variant(name: str, seed: int, train_files, config) -> tuple:
    """(pre-ranker stage layer, RankingStage) of one variant."""
    tf.keras.utils.set_random_seed(seed)
    config = dataclasses.replace(config, seed=seed)
    if name != "survivors":
        model = cascade_trainer.build_model(config, VARIANTS[name])
        fit(model, train_files, config)
        return model.stage_models[0], model.ranking_stage
    light = cascade_trainer.build_model(config, VARIANTS[name]).stage_models[0]
    prerank = fit(CascadeModel({"prerank": light}, method=config.method, quota=config.quota, tau=config.tau),
                  train_files, config)
    train = load_lists(train_files, LI.list_size_in(train_files))
    scores = prerank.predict_stage_scores(train)[0]
    survivors = top_k_mask(scores, np.asarray(train["mask"]) > 0, QUOTAS[1])
    cut = {**train, "mask": survivors.astype(np.int64)}
    ranking = RankingStage(FactoryFloorRanker(VARIANTS[name]), name="rank")
    fit(CascadeModel({"rank": ranking}, method=config.method, quota=config.quota, tau=config.tau), train_files,
        config, lists_in_memory=cut)
    return light, ranking


def evaluate(light, ranking: RankingStage, evals, retrieval_grid, mask) -> dict:
    logged = {**evals, "mask": mask.astype(np.int64)}
    prerank = np.concatenate([light(b, training=False).numpy() for b in LI.dataset_from_lists(logged, 256)])
    rank = np.concatenate([ranking(b, training=False).numpy() for b in LI.dataset_from_lists(logged, 256)])
    gt = cascade_labels(logged).numpy() > 0
    stages = [retrieval_grid, np.where(mask, prerank, -np.inf), np.where(mask, rank, -np.inf)]
    out = {"e2e_recall": metrics.e2e_recall(stages, gt, QUOTAS, mask),
           "ranking_recall@20": metrics.stage_recall(stages[2], gt, 20, mask=mask),
           "preranking_recall@20": metrics.stage_recall(stages[1], gt, 20, mask=mask)}
    out.update({f"ctr_{k}": v for k, v in cascade_trainer.ctr_metrics(ranking.ranker, logged).items()
                if k in ("auc", "ne", "calibration")})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="cascade_output", help="a pipeline output dir (`cascade run --output-dir`)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    train_files, eval_files, retrieval_dir = pipeline_inputs(args.run)
    config = cascade_trainer.CascadeTrainerConfig()
    evals = load_lists(eval_files, LI.list_size_in(eval_files))
    mask = (np.asarray(evals["mask"]) > 0) & (np.asarray(evals["stage"]) != RL.TIER_INDEX[RL.RANDOM_NEG_TIER])
    retrieval_grid = retrieval_scores(retrieval_dir, evals, mask)
    results = {}
    for name in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.time()
            light, ranking = train_variant(name, seed, train_files, config)
            figures = evaluate(light, ranking, evals, retrieval_grid, mask)
            figures["train_seconds"] = time.time() - start
            results.setdefault(name, []).append(figures)
            print(name, seed, json.dumps({k: round(v, 4) for k, v in figures.items()}), flush=True)
            tf.keras.backend.clear_session()
    keys = list(next(iter(results.values()))[0])
    print(f"\nranking-stage variants on the inputs of {args.run} (mean ± std over seeds {args.seeds}):")
    print(f"{'variant':20s} " + " ".join(f"{k:>22s}" for k in keys))
    for name, runs in results.items():
        print(f"{name:20s} " + " ".join(f"{mean_std([r[k] for r in runs]):>22s}" for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "train_files": train_files, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
