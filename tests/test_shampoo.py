"""Tests for models/shampoo.py (Shampoo with AdaGrad grafting) and its use in the ranker
(`RankerConfig(optimizer="shampoo")`: Shampoo for the dense weights, Adagrad for the embedding
tables), each against a small independent numpy computation."""
import numpy as np
import pytest
import tensorflow as tf

from cascade_ranking.models import cascade_model as CM
from cascade_ranking.models import list_inputs as LI
from cascade_ranking.models import ranker, shampoo
from cascade_ranking.models.preranking import LightPreranker
from cascade_ranking.models.ranker_config import RankerConfig
from cascade_ranking.models.ranking_stage import RankingStage
from tests.test_ranker import SMALL, make_rows, serialize, to_tensors

FLOOR = 1e-16  # the roots' absolute ridge δ (shampoo.ABSOLUTE_RIDGE)


# ---- numpy reference ------------------------------------------------------------------------------
def np_inverse_root(x, p=4, ridge_epsilon=0.0, floor=FLOOR):
    """X^{-1/p} in float64 via numpy's eigh, with the ridge ε·λ_max + δ."""
    w, v = np.linalg.eigh(np.asarray(x, np.float64))
    w = np.maximum(w, 0.0)
    return (v * (w + ridge_epsilon * w.max() + floor) ** (-1.0 / p)) @ v.T


class NumpyShampoo:
    """Shampoo with AdaGrad grafting on one matrix variable, in float64, block by block."""

    def __init__(self, shape, lr, block_size, start, every, eps, beta2=1.0, acc0=0.1, adagrad_eps=1e-7):
        self.lr, self.b, self.start, self.every, self.eps, self.beta2 = lr, block_size, start, every, eps, beta2
        self.adagrad_eps = adagrad_eps
        self.acc = np.full(shape, acc0)
        m, n = shape
        self.rows = [slice(i, min(i + min(block_size, m), m)) for i in range(0, m, min(block_size, m))]
        self.cols = [slice(j, min(j + min(block_size, n), n)) for j in range(0, n, min(block_size, n))]
        self.L = {(i, j): np.zeros((r.stop - r.start,) * 2) for i, r in enumerate(self.rows) for j, _ in enumerate(self.cols)}
        self.R = {(i, j): np.zeros((c.stop - c.start,) * 2) for i, _ in enumerate(self.rows) for j, c in enumerate(self.cols)}
        self.L_root, self.R_root = {}, {}
        self.t = 0

    def step(self, g):
        """The update (to subtract) for gradient g; advances the state."""
        g = np.asarray(g, np.float64)
        self.acc += g * g
        adagrad = self.lr * g / np.sqrt(self.acc + self.adagrad_eps)
        direction = np.zeros_like(g)
        for (i, j) in self.L:
            block = g[self.rows[i], self.cols[j]]
            self.L[i, j] = self.beta2 * self.L[i, j] + (1 - self.beta2 if self.beta2 < 1 else 1) * block @ block.T
            self.R[i, j] = self.beta2 * self.R[i, j] + (1 - self.beta2 if self.beta2 < 1 else 1) * block.T @ block
            if self.t >= self.start and (self.t - self.start) % self.every == 0:
                self.L_root[i, j] = np_inverse_root(self.L[i, j], 4, self.eps)
                self.R_root[i, j] = np_inverse_root(self.R[i, j], 4, self.eps)
            if self.t >= self.start:
                direction[self.rows[i], self.cols[j]] = self.L_root[i, j] @ block @ self.R_root[i, j]
        warm = self.t < self.start
        self.t += 1
        if warm:
            return adagrad
        return np.linalg.norm(adagrad) / np.linalg.norm(direction) * direction


# ---- the inverse root ----------------------------------------------------------------------------
def test_inverse_fourth_root_of_an_ill_conditioned_matrix_is_accurate():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    eigenvalues = np.logspace(0, -8, 24)  # condition number 1e8
    x = (q * eigenvalues) @ q.T
    x = 0.5 * (x + x.T)
    root = shampoo.inverse_pth_root(tf.constant(x), 4).numpy()
    assert root.dtype == np.float64
    expected = np_inverse_root(x, 4, floor=0.0)
    assert np.linalg.norm(root - expected) / np.linalg.norm(expected) < 1e-6
    back = np.linalg.matrix_power(np.linalg.inv(root), 4)  # (X^{-1/4})^{-4} = X
    assert np.linalg.norm(back - x) / np.linalg.norm(x) < 1e-6
    # From float32 input, batched, with a relative ridge: each matrix its own λ_max.
    batch = np.stack([x, 3.0 * x]).astype(np.float32)
    roots = shampoo.inverse_pth_root(batch, 4, ridge_epsilon=1e-4).numpy()
    for k in range(2):
        want = np_inverse_root(batch[k].astype(np.float64), 4, ridge_epsilon=1e-4)
        assert np.linalg.norm(roots[k] - want) / np.linalg.norm(want) < 1e-6
    # All-zero statistics: the floor gives δ^{-1/4}·I.
    np.testing.assert_allclose(shampoo.inverse_pth_root(np.zeros((3, 3)), 4).numpy(), FLOOR ** -0.25 * np.eye(3))


# ---- the optimizer against numpy ------------------------------------------------------------------
@pytest.mark.parametrize("every, beta2", [(1, 1.0), (3, 0.9)])
def test_steps_on_a_quadratic_equal_numpy_shampoo_grafted_onto_adagrad(every, beta2):
    """f(W) = ½‖AW − B‖², ∇f = Aᵀ(AW − B): a warm-up of AdaGrad steps, then grafted Shampoo steps
    with roots recomputed every `every` steps (and stale in between), the statistics summed or
    averaged (beta2)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(9, 6)), rng.normal(size=(9, 5))
    w = tf.Variable(rng.normal(size=(6, 5)).astype(np.float32))
    lr, start, eps = 0.05, 3, 1e-4
    opt = shampoo.Shampoo(lr, block_size=128, start_preconditioning_step=start, preconditioning_compute_steps=every,
                          matrix_epsilon=eps, beta2=beta2)
    reference = NumpyShampoo((6, 5), lr, 128, start, every, eps, beta2)
    acc = np.full((6, 5), 0.1)
    for t in range(9):
        before = w.numpy().astype(np.float64)
        g = (a.T @ (a @ before - b)).astype(np.float32)
        opt.apply_gradients([(tf.constant(g), w)])
        step = before - w.numpy().astype(np.float64)
        want = reference.step(g)
        np.testing.assert_allclose(step, want, rtol=2e-4, atol=2e-6, err_msg=f"step {t}")  # W in float32
        acc += g.astype(np.float64) ** 2
        adagrad = lr * g / np.sqrt(acc + 1e-7)
        # Grafting: the step has AdaGrad's norm (and, after the warm-up, not its direction).
        assert np.linalg.norm(step) == pytest.approx(np.linalg.norm(adagrad), rel=1e-4)
        if t >= start:
            assert np.abs(step / np.linalg.norm(step) - adagrad / np.linalg.norm(adagrad)).max() > 1e-3
    assert opt.is_preconditioned(w) and int(opt.iterations) == 9


def test_the_roots_are_recomputed_on_schedule_only():
    rng = np.random.default_rng(2)
    w = tf.Variable(rng.normal(size=(4, 3)).astype(np.float32))
    opt = shampoo.Shampoo(0.1, start_preconditioning_step=2, preconditioning_compute_steps=3)
    changed = []
    for t in range(9):
        roots = [v.numpy().copy() for v in (opt.slots(w)["left_root"], opt.slots(w)["right_root"])] if t else None
        opt.apply_gradients([(tf.constant(rng.normal(size=(4, 3)).astype(np.float32)), w)])
        if t:
            after = (opt.slots(w)["left_root"].numpy(), opt.slots(w)["right_root"].numpy())
            changed.append(any(np.abs(x - y).max() > 0 for x, y in zip(roots, after)))
    assert [t for t, c in zip(range(1, 9), changed) if c] == [2, 5, 8]  # t₀, t₀ + k, t₀ + 2k


def test_warm_up_equals_keras_adagrad_bit_for_bit():
    rng = np.random.default_rng(3)
    shapes = [(6, 5), (5,), (2, 3, 4), (40, 3)]
    initial = [rng.normal(size=s).astype(np.float32) for s in shapes]
    ours = [tf.Variable(x) for x in initial]
    keras = [tf.Variable(x) for x in initial]
    # (40, 3) has a dimension above max_preconditioner_dim: AdaGrad alone, with a sparse gradient too.
    opt = shampoo.Shampoo(0.1, start_preconditioning_step=10, max_preconditioner_dim=32)
    adagrad = tf.keras.optimizers.Adagrad(0.1)
    for _ in range(5):
        grads = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes[:3]]
        rows = tf.constant([1, 7, 7, 30])
        sparse = tf.IndexedSlices(tf.constant(rng.normal(size=(4, 3)).astype(np.float32)), rows, tf.constant([40, 3]))
        opt.apply_gradients(zip(grads + [sparse], ours))
        adagrad.apply_gradients(zip(grads + [sparse], keras))
        for x, y in zip(ours, keras):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert [opt.is_preconditioned(v) for v in ours] == [True, False, True, False]
    assert opt.layout(ours[2]) == shampoo.BlockLayout(6, 4, 1, 1, 6, 4)  # [2, 3, 4] seen as [6, 4]


def test_a_300_by_200_variable_is_preconditioned_block_by_block():
    rng = np.random.default_rng(4)
    w = tf.Variable(rng.normal(size=(300, 200)).astype(np.float32))
    g = rng.normal(size=(300, 200)).astype(np.float32)
    opt = shampoo.Shampoo(0.1, block_size=128, start_preconditioning_step=0, matrix_epsilon=1e-6)
    before = w.numpy().astype(np.float64)
    opt.apply_gradients([(tf.constant(g), w)])
    step = before - w.numpy()
    assert opt.layout(w) == shampoo.BlockLayout(300, 200, 3, 2, 128, 128)
    slots = opt.slots(w)
    assert slots["left_statistics"].shape == (3, 2, 128, 128) and slots["right_root"].shape == (3, 2, 128, 128)
    # The corner block rows 256:300, columns 128:200 (44 × 72, zero-padded to 128 × 128), by hand.
    block = g[256:, 128:].astype(np.float64)
    left = slots["left_statistics"].numpy()[2, 1]
    np.testing.assert_allclose(left[:44, :44], block @ block.T, rtol=1e-5, atol=1e-4)
    assert np.abs(left[44:]).max() == 0 and np.abs(left[:, 44:]).max() == 0
    direction = np_inverse_root(block @ block.T, 4, 1e-6) @ block @ np_inverse_root(block.T @ block, 4, 1e-6)
    # That block's step is its own direction L^-1/4 G R^-1/4, up to the grafting's one scale ...
    np.testing.assert_allclose(step[256:, 128:] / np.linalg.norm(step[256:, 128:]),
                               direction / np.linalg.norm(direction), rtol=2e-3, atol=1e-5)
    # ... and the whole step is the six blocks' directions grafted onto AdaGrad's norm.
    want = NumpyShampoo((300, 200), 0.1, 128, 0, 1, 1e-6).step(g)
    np.testing.assert_allclose(step, want, rtol=2e-3, atol=1e-6)


def test_nesterov_momentum_on_the_update():
    rng = np.random.default_rng(5)
    w = tf.Variable(rng.normal(size=(5,)).astype(np.float32))
    opt = shampoo.Shampoo(0.1, momentum=0.9, nesterov=True)
    acc, m, expected = np.full(5, 0.1), np.zeros(5), w.numpy().astype(np.float64)
    for _ in range(4):
        g = rng.normal(size=5).astype(np.float32)
        opt.apply_gradients([(tf.constant(g), w)])
        acc += g.astype(np.float64) ** 2
        update = 0.1 * g / np.sqrt(acc + 1e-7)
        m = 0.9 * m + update
        expected -= 0.9 * m + update
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5)


def test_get_config_round_trip_and_validation():
    opt = shampoo.Shampoo(0.3, block_size=64, start_preconditioning_step=7, preconditioning_compute_steps=4,
                          matrix_epsilon=1e-5, beta2=0.99, momentum=0.5, nesterov=True, use_ema=True, ema_momentum=0.9)
    config = opt.get_config()
    again = shampoo.Shampoo.from_config(config)
    assert again.get_config() == config and again.use_ema and again.ema_momentum == 0.9
    assert tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt)).get_config() == config
    for bad in (dict(block_size=0), dict(preconditioning_compute_steps=0), dict(beta2=0.0), dict(momentum=1.0)):
        with pytest.raises(ValueError):
            shampoo.Shampoo(**bad)


# ---- the ranker -----------------------------------------------------------------------------------
SHAMPOO = dict(SMALL, optimizer="shampoo", learning_rate=0.05, shampoo_start_step=2, shampoo_update_every=2,
               shampoo_block_size=8, ema_momentum=0.5, rank_loss="none", distill_weight=0.0, bias_constraints=False)


def _ranker(rows, **changes):
    tf.keras.utils.set_random_seed(0)
    model = ranker.FactoryFloorRanker(RankerConfig(**{**SHAMPOO, **changes}))
    batch = to_tensors(rows)
    model.adapt(tf.data.Dataset.from_tensors(batch), steps=1)
    model.compile()
    model.build_train_step(batch)  # models.tasks's slot-building helper, through optimizer_variables
    return model, batch


def test_a_shampoo_ranker_steps_dense_weights_with_shampoo_and_tables_with_adagrad(tmp_path):
    rows = make_rows(6, seed=2)
    model, batch = _ranker(rows)
    shampoo_opt, tables_opt = model.optimizer, model.embedding_optimizer
    assert isinstance(shampoo_opt, shampoo.Shampoo) and isinstance(tables_opt, tf.keras.optimizers.Adagrad)
    tables = {shampoo_opt._var_key(v) for v in model.embedding.trainable_variables}
    dense = {shampoo_opt._var_key(v) for v in model.trainable_variables} - tables
    assert tables and dense
    assert set(shampoo_opt._index_dict) == dense and set(tables_opt._index_dict) == tables  # disjoint slots
    kernels = [v for v in model.trainable_variables if v.shape.rank == 2 and shampoo_opt._var_key(v) in dense]
    assert kernels and all(shampoo_opt.is_preconditioned(v) for v in kernels)
    assert not any(shampoo_opt.is_preconditioned(v) for v in model.trainable_variables if v.shape.rank < 2)

    loss_before = float(model.loss_terms(batch, step=0, training=False)["logistic"])
    tables_before = [v.numpy().copy() for v in model.embedding.trainable_variables]
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(6), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # One step each: the curriculum reads Shampoo's counter, which the tables' Adagrad does not advance.
    assert int(shampoo_opt.iterations) == 6 and int(tables_opt.iterations) == 6 and int(model.cross.step) == 6
    assert float(model.loss_terms(batch, step=0, training=False)["logistic"]) < loss_before
    assert all(np.abs(a - v.numpy()).max() > 0 for a, v in zip(tables_before, model.embedding.trainable_variables))
    left_root = shampoo_opt.slots(kernels[0])["left_root"].numpy()
    assert np.abs(left_root - np.eye(left_root.shape[-1])).max() > 1e-3  # preconditioned after the warm-up
    # fit ended by writing each optimizer's EMA into its own variables.
    for opt in (shampoo_opt, tables_opt):
        for v in model.trainable_variables:
            key = opt._var_key(v)
            if key in opt._index_dict:
                np.testing.assert_array_equal(v.numpy(), opt._model_variables_moving_average[opt._index_dict[key]].numpy())

    # A checkpoint holds both optimizers' slots and restores them.
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    saved = tf.train.list_variables(path)
    table_slots = [shape for name, shape in saved if name.startswith(f"model/{ranker.EMBEDDING_OPTIMIZER_KEY}/_variables/")]
    dense_slots = [shape for name, shape in saved if name.startswith("model/optimizer/_variables/")]
    assert len(table_slots) == 2 * len(tables)  # an accumulator and an EMA per table
    assert sorted(table_slots) == sorted(2 * [list(v.shape) for v in model.embedding.trainable_variables])
    assert any(len(shape) == 4 for shape in dense_slots)  # Shampoo's block statistics and roots
    fresh, _ = _ranker(rows)
    tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    for saved, restored in ((model.optimizer, fresh.optimizer), (model.embedding_optimizer, fresh.embedding_optimizer)):
        assert len(saved.variables) == len(restored.variables)
        for a, b in zip(saved.variables, restored.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A SavedModel leaves the tables' optimizer out (checkpoint only, like the duals).
    tf.saved_model.save(model, str(tmp_path / "saved"))
    exported = tf.train.load_checkpoint(str(tmp_path / "saved" / "variables" / "variables")).get_variable_to_shape_map()
    assert exported and not any(ranker.EMBEDDING_OPTIMIZER_KEY in name for name in exported)


def test_an_adagrad_ranker_has_one_optimizer():
    model, _ = _ranker(make_rows(2, seed=3), optimizer="adagrad")
    assert model.embedding_optimizer is None and isinstance(model.optimizer, tf.keras.optimizers.Adagrad)
    assert model.optimizer_variables(model.trainable_variables) == [(model.optimizer, model.trainable_variables)]


def test_the_joint_cascade_steps_the_rankers_tables_with_adagrad(tmp_path):
    """The pipeline's ranking Trainer: the RankingStage builds the ranker's optimizers itself."""
    rows = make_rows(6, seed=4)
    path = str(tmp_path / "rows.gz")
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for i in range(len(rows["click"])):
            writer.write(serialize(rows, i))
    lists = LI.group_rows(LI.read_candidate_rows([path]), list_size=10)
    batch = next(iter(LI.dataset_from_lists(lists, 6)))
    tf.keras.utils.set_random_seed(0)
    stage = RankingStage(ranker.FactoryFloorRanker(RankerConfig.cascade_stage(**{**SHAMPOO, "cascade_head_units": (8,)})))
    model = CM.CascadeModel({"prerank": LightPreranker(4, (8,), 8, (8,), name="prerank"), "rank": stage}, method="lcron")
    model.adapt(lists)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    model.build_train_step(batch)
    for _ in range(3):
        model.train_step(batch)
    tables = {id(v) for v in stage.ranker.embedding.trainable_variables}
    owners = {}
    for opt in (model.optimizer, stage.optimizer, stage.embedding_optimizer):
        for v in model.trainable_variables:
            if opt._var_key(v) in opt._index_dict:
                owners.setdefault(id(v), []).append(opt)
    assert all(len(o) == 1 for o in owners.values())  # each variable steps with one optimizer
    assert all(owners[id(v)] == [stage.embedding_optimizer] for v in stage.ranker.embedding.trainable_variables)
    assert all(owners[id(v)] == [stage.optimizer] for v in stage.ranker_variables if id(v) not in tables)
    assert all(owners[id(v)] == [model.optimizer] for v in stage.cascade_variables)
    assert isinstance(stage.optimizer, shampoo.Shampoo) and int(stage.step) == 3
    stage.finalize()  # each of the ranker's optimizers writes its EMA into its own variables
    for opt, variables in stage.optimizer_variables(stage.ranker_variables):
        for v in variables:
            np.testing.assert_array_equal(
                v.numpy(), opt._model_variables_moving_average[opt._index_dict[opt._var_key(v)]].numpy())


# ---- config ---------------------------------------------------------------------------------------
def test_config_round_trip_validation_and_optimizers():
    config = RankerConfig(optimizer="shampoo", shampoo_block_size=64, shampoo_beta2=0.99, shampoo_momentum=0.5)
    assert RankerConfig.from_json(config.to_json()) == config
    opt = ranker.make_optimizer(config)
    assert isinstance(opt, shampoo.Shampoo) and opt.block_size == 64 and opt.beta2 == 0.99 and opt.momentum == 0.5
    assert opt.use_ema and opt.start_preconditioning_step == 100 and opt.preconditioning_compute_steps == 10
    tables = ranker.make_embedding_optimizer(config)
    assert isinstance(tables, tf.keras.optimizers.Adagrad) and tables.use_ema
    assert float(tables.learning_rate) == pytest.approx(config.learning_rate)
    assert ranker.make_embedding_optimizer(RankerConfig()) is None
    with pytest.raises(ValueError, match="optimizer must be one of") as error:
        RankerConfig(optimizer="sgd")
    assert "\n" not in str(error.value)
    for bad in (dict(shampoo_block_size=0), dict(shampoo_update_every=0), dict(shampoo_start_step=-1),
                dict(shampoo_beta2=1.5), dict(shampoo_momentum=1.0), dict(shampoo_epsilon=-1.0)):
        with pytest.raises(ValueError, match="shampoo"):
            RankerConfig(**bad)
    try:
        from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad
    except ImportError:
        with pytest.raises(ValueError, match="ClippyAdagrad"):
            ranker.make_optimizer(RankerConfig(optimizer="clippy_adagrad"))
    else:
        assert isinstance(ranker.make_optimizer(RankerConfig(optimizer="clippy_adagrad")), ClippyAdagrad)


def test_the_optimizer_flag_and_set_reach_the_ranker_and_the_teacher():
    from cascade_ranking.pipelines import cli

    config = cli.run_config(cli.build_parser().parse_args(["run", "--optimizer", "shampoo"]))
    assert config.ranker.optimizer == "shampoo" and config.teacher.optimizer == "adagrad"
    config = cli.run_config(cli.build_parser().parse_args(
        ["config", "--set", "teacher.optimizer=shampoo", "--set", "ranker.shampoo_update_every=5"]))
    assert config.teacher.optimizer == "shampoo" and config.ranker.shampoo_update_every == 5
