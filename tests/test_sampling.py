"""components.sampling with a non-default registry, without Beam: the columnar path (what the
NegativeSampler runs) against the row reference, random negatives, the corpus columns."""
import collections

import numpy as np
import pytest
from tensorflow_metadata.proto.v0 import schema_pb2

from cascade_ranking.components import negative_sampler, sampling
from cascade_ranking.components.sampling import SamplerConfig
from cascade_ranking.datasources import example_io
from cascade_ranking.schema import features as F
from cascade_ranking.schema import request_list as RL

IF = F.InputFeature
# int item key, int multivalent item feature, declared ui_position, a dense UI feature, string query id
FEATURES = F.FeatureConfig(
    inputs=(
        IF("account", "query", dtype="string", buckets=100),
        IF("session_vec", "query", "dense", width=3),
        IF("product", "item", buckets=1_000),
        IF("colours", "item", "ids", width=4, buckets=16),
        IF("price", "item", "dense", width=1),
        IF("ui_position", "ui", buckets=11),
        IF("layout_vec", "ui", "dense", width=2),
    ),
    item_key="product",
)
KEYS = ("request_id", "request_time", "click", "stage", "true_ctr", "teacher_logit", "sample_weight")


def _schema(features) -> schema_pb2.Schema:
    schema = schema_pb2.Schema()
    schema.feature.extend(f for f in F.load_schema().feature if f.name in KEYS)
    for f in features.resolved():
        feature = schema.feature.add(name=f.name, type=f.schema_type)
        if f.is_dense:
            feature.shape.dim.add(size=f.width)
        elif not f.multivalent:
            feature.value_count.min = feature.value_count.max = 1
        feature.presence.min_fraction, feature.presence.min_count = 1.0, 1
    return schema


def _rows(request_id: int):
    rng = np.random.default_rng(request_id)
    query = {"request_id": request_id, "request_time": 50 + request_id, "account": f"acct-{request_id % 3}",
             "session_vec": rng.normal(size=3).astype(np.float32).tolist()}
    rows = []
    for slot, item in enumerate(rng.choice(60, size=30, replace=False).tolist()):
        rows.append(dict(query, product=item, colours=[(item * 3 + j) % 16 for j in range(1 + item % 6)],
                         price=[float(np.float32(item / 7))], ui_position=slot + 1 if slot < 8 else 0,
                         layout_vec=[float(slot), 0.5], click=int(slot == 2), stage=F.STAGE_TIERS[slot // 6],
                         teacher_logit=float(rng.normal() * 4), true_ctr=float(rng.random())))
    return rows


def test_columnar_path_matches_the_row_reference_for_a_registry():
    config = SamplerConfig(list_size=45, random_negatives=10, nonclick_keep_rate=0.5, low_loss_keep_rate=0.5,
                           low_loss_threshold=0.2, seed=4)
    scalars = negative_sampler._scalar_features(_schema(FEATURES))
    decoder = negative_sampler.CandidateDecoder(_schema(FEATURES), FEATURES)
    requests = {r: _rows(r) for r in range(8)}
    items = collections.defaultdict(lambda: [0, None])
    for rows in requests.values():
        for row in rows:
            items[row["product"]][0] += 1
            items[row["product"]][1] = {f.name: row[f.name] for f in sampling.item_features(FEATURES)}
    corpus = sampling.ItemCorpus.from_items([(i, c, f) for i, (c, f) in items.items()], features=FEATURES)
    assert set(corpus.columns) == {"colours", "price"} and corpus.columns["colours"].shape == (len(items), 4)
    totals = collections.Counter()
    for request_id, rows in requests.items():
        raws = [example_io.make_example(r).SerializeToString() for r in rows]
        cols, good, bad = decoder.decode(raws)
        assert not bad and good.size == 30
        fast_counts, ref_counts = {}, {}
        fast = negative_sampler.packed_example(sampling.sample_request_columns(cols, corpus, config, fast_counts, FEATURES),
                                               FEATURES)
        ref_rows = sampling.sample_request([negative_sampler.example_to_row(example_io.make_example(r), scalars)
                                            for r in rows], corpus, config, ref_counts, FEATURES)
        reference = example_io.make_example(RL.build_request_list(ref_rows, config.list_size, FEATURES))
        assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(deterministic=True)
        assert fast_counts == ref_counts
        totals.update(fast_counts)
        randoms = [r for r in ref_rows if r["stage"] == RL.RANDOM_NEG_TIER]
        assert len(randoms) == 10 and all(r["ui_position"] == 0 and r["layout_vec"] == [0.0, 0.0] for r in randoms)
        feature = fast.features.feature
        assert list(feature["layout_vec"].float_list.value[30 * 2:]) == [0.0] * (15 * 2)  # randoms and padding
        assert feature["account"].bytes_list.value == [f"acct-{request_id % 3}".encode()]
        assert "ui_position" in feature and len(feature["colours"].int64_list.value) == 45 * 4
    assert totals["sampled_out_low_loss"] > 0 and totals["sampled_out_class"] > 0


def test_value_counts_cut_and_fold_per_registry_feature():
    decoder = negative_sampler.CandidateDecoder(_schema(FEATURES), FEATURES)
    rows = _rows(1)
    cols, _, _ = decoder.decode([example_io.make_example(r).SerializeToString() for r in rows])
    counts = negative_sampler.value_counts(cols, FEATURES)
    assert counts["values_cut_colours"] == sum(max(0, len(r["colours"]) - 4) for r in rows) > 0
    assert counts["ids_folded_colours"] == 0 and counts["ids_folded_product"] == 0
    assert counts["nan_values_session_vec"] == 0 and "ids_folded_account" not in counts


def test_uniform_hash_of_an_int_id_is_that_of_the_default_registry():
    """The decisions on int ids are those of every earlier run: the same keys, the same text hashed."""
    assert sampling.uniform_hash(0, "split", 12) == pytest.approx(sampling.uniform_hash(0, "split", np.int64(12)))
    assert sampling.uniform_hash(0, "split", 12) != sampling.uniform_hash(0, "split", b"12")
