"""Shampoo with AdaGrad grafting: the optimizer of the ranker's dense weights (Factory Floor §4.2).

Sources: Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization" (ICML 2018);
Anil, Gupta, Koren, Regan, Singer, "Scalable Second Order Optimization for Deep Learning" (2020),
which adds blocking, the periodic inverse roots, grafting and the warm-up; Anil et al., "On the
Factory Floor: ML Engineering for Industrial-Scale Ads Recommendation Models" (2022) §4.2, which
trains the ranker's dense layers with it (and its embedding tables with AdaGrad: `models.ranker`).

For a variable W with gradient G at step t (t = `optimizer.iterations` before the step, from 0):

  2-D view.    A rank-2 W is a matrix [m, n]; a higher rank is reshaped to [∏ leading dims, last dim].
  Blocks.      The matrix is cut into blocks of b_r × b_c, b_r = min(b, m), b_c = min(b, n)
               (b = `block_size`): ⌈m/b_r⌉ × ⌈n/b_c⌉ blocks, the last ones zero-padded (a padded
               block's preconditioner is block-diagonal in its real and padded parts, so the padding
               changes nothing: its rows and columns of the direction are 0 and are cut off).
  Statistics,  per block with gradient block G_B, from L_B = R_B = 0:
                   L_B ← L_B + G_B G_Bᵀ,   R_B ← R_B + G_Bᵀ G_B                     (beta2 = 1, the default)
                   L_B ← β₂ L_B + (1 − β₂) G_B G_Bᵀ,  R_B likewise                  (beta2 < 1: an EMA)
               updated at every step, the warm-up's included.
  Roots.       At t = t₀, t₀ + k, t₀ + 2k, … (t₀ = `start_preconditioning_step`,
               k = `preconditioning_compute_steps`), from the statistics after the step's update, in
               float64 through the eigendecomposition X = V diag(λ) Vᵀ (`tf.linalg.eigh`):
                   X^{-1/p} = V diag((max(λ_i, 0) + ε·λ_max + δ)^{-1/p}) Vᵀ,   p = 4
               (p = 2 × the order 2 of a matrix; ε = `matrix_epsilon`, a ridge relative to the
               largest eigenvalue; δ = ABSOLUTE_RIDGE, a floor for all-zero statistics), stored as
               float32 optimizer variables and used until the next recomputation. The statistics
               themselves are kept in float64: in float32 their rounding (~1e-7·λ_max per sum) is
               of the order of the ridge (1e-6·λ_max by default), and the small eigenvalues, which
               the roots magnify most, would be mostly noise.
  Direction.   D_B = L_B^{-1/4} G_B R_B^{-1/4} per block, D assembled from the blocks (a
               block-diagonal preconditioner).
  AdaGrad.     Per element, `tf.keras.optimizers.Adagrad`'s formula and defaults:
                   acc ← acc + G²  (acc starts at `initial_accumulator_value` = 0.1),
                   A = lr · G / sqrt(acc + epsilon)   (epsilon = 1e-7; Keras adds ε under the root)
  Grafting.    Per variable ("layer-wise"): U = (‖A‖_F / ‖D‖_F) · D, U = 0 when D = 0: Shampoo's
               direction at AdaGrad's step size.
  Warm-up.     For t < t₀, U = A: the update is Keras Adagrad's, bit for bit.
  Momentum.    Optional (`momentum` μ > 0; off by default): m ← μ·m + U, then the step is
               μ·m + U with `nesterov`, m without.
  Step.        W ← W − U (or the momentum step).

Variables without a preconditioner step with AdaGrad alone (A, with the momentum if any): rank 0
or 1 (biases, scalars), and variables whose 2-D view has a dimension larger than
`max_preconditioner_dim` (e.g. a large embedding table, which would need thousands of blocks).
A sparse gradient (`tf.IndexedSlices`, an embedding lookup's) of such a variable takes Keras
Adagrad's sparse update (without momentum); of a preconditioned variable, or with momentum, it is
made dense.

Every state is an optimizer variable (`add_variable_from_reference`; the float64 statistics
`add_variable`, placed with their variable), so checkpoints hold it:
per variable the AdaGrad accumulator (and momentum); per preconditioned variable the statistics
L [nr, nc, b_r, b_r], R [nr, nc, b_c, b_c] (float64) and their stored roots (float32, identity until t₀).

Written by hand from the papers' formulas: TF 2.15's Keras has no Shampoo (nothing was copied from
Lingvo, Optax or any other implementation).
"""
import math
from typing import NamedTuple, Optional, Sequence

import tensorflow as tf

ROOT_EXPONENT = 4  # p of the inverse p-th roots of a matrix's statistics: 2 × its order (2)
ABSOLUTE_RIDGE = 1e-16  # δ: added to every eigenvalue, so all-zero statistics still have a root


class BlockLayout(NamedTuple):
    """The 2-D view [rows, cols] of a variable and its blocks: num_row_blocks × num_col_blocks blocks
    of block_rows × block_cols (the last ones zero-padded)."""

    rows: int
    cols: int
    num_row_blocks: int
    num_col_blocks: int
    block_rows: int
    block_cols: int


def block_layout(shape: Sequence[int], block_size: int, max_preconditioner_dim: int) -> Optional[BlockLayout]:
    """The blocks of a variable of `shape`, or None when it steps with AdaGrad alone (rank < 2, or
    a dimension of its 2-D view larger than `max_preconditioner_dim`)."""
    shape = [int(d) for d in shape]
    if len(shape) < 2 or 0 in shape:
        return None
    rows, cols = math.prod(shape[:-1]), shape[-1]
    if max(rows, cols) > max_preconditioner_dim:
        return None
    block_rows, block_cols = min(block_size, rows), min(block_size, cols)
    return BlockLayout(rows, cols, -(-rows // block_rows), -(-cols // block_cols), block_rows, block_cols)


def to_blocks(matrix: tf.Tensor, layout: BlockLayout) -> tf.Tensor:
    """[rows, cols] → [num_row_blocks, num_col_blocks, block_rows, block_cols], zero-padded."""
    padded = tf.pad(matrix, [[0, layout.num_row_blocks * layout.block_rows - layout.rows],
                             [0, layout.num_col_blocks * layout.block_cols - layout.cols]])
    blocks = tf.reshape(padded, [layout.num_row_blocks, layout.block_rows, layout.num_col_blocks, layout.block_cols])
    return tf.transpose(blocks, [0, 2, 1, 3])


def from_blocks(blocks: tf.Tensor, layout: BlockLayout) -> tf.Tensor:
    """The inverse of `to_blocks`: [nr, nc, b_r, b_c] → [rows, cols] (padding cut off)."""
    padded = tf.reshape(tf.transpose(blocks, [0, 2, 1, 3]),
                        [layout.num_row_blocks * layout.block_rows, layout.num_col_blocks * layout.block_cols])
    return padded[:layout.rows, :layout.cols]


def inverse_pth_root(matrix, p: int = ROOT_EXPONENT, ridge_epsilon: float = 0.0,
                     absolute_ridge: float = ABSOLUTE_RIDGE) -> tf.Tensor:
    """X^{-1/p} of symmetric positive semi-definite matrices [..., n, n], in float64:
    V diag((max(λ, 0) + ridge_epsilon·λ_max + absolute_ridge)^{-1/p}) Vᵀ with X = V diag(λ) Vᵀ
    (`tf.linalg.eigh` of the symmetrised X; λ_max per matrix)."""
    x = tf.cast(matrix, tf.float64)
    x = 0.5 * (x + tf.linalg.matrix_transpose(x))
    eigenvalues, eigenvectors = tf.linalg.eigh(x)
    eigenvalues = tf.maximum(eigenvalues, 0.0)  # rounding can make a zero eigenvalue slightly negative
    ridge = ridge_epsilon * tf.reduce_max(eigenvalues, axis=-1, keepdims=True) + absolute_ridge
    scales = tf.pow(eigenvalues + ridge, -1.0 / p)
    return tf.matmul(eigenvectors * scales[..., tf.newaxis, :], eigenvectors, adjoint_b=True)


@tf.keras.utils.register_keras_serializable(package="cascade_ranking")
class Shampoo(tf.keras.optimizers.Optimizer):
    """Blocked Shampoo with layer-wise AdaGrad grafting and an AdaGrad warm-up (module docstring).

    Args (beside Keras's optimizer arguments: use_ema, ema_momentum, clipnorm, ...):
        learning_rate: lr of the AdaGrad step that sets each update's size.
        block_size: b, the largest block side of a preconditioned matrix.
        start_preconditioning_step: t₀; before it the update is AdaGrad's.
        preconditioning_compute_steps: k; the inverse roots are recomputed every k steps from t₀.
        matrix_epsilon: ε, the roots' ridge relative to the largest eigenvalue.
        beta2: 1 sums the statistics; < 1 keeps an exponential moving average of them.
        momentum, nesterov: μ of the (Nesterov) momentum on the grafted update (0: none).
        max_preconditioner_dim: a variable whose 2-D view has a larger dimension steps with AdaGrad.
        initial_accumulator_value, epsilon: AdaGrad's (Keras's defaults).
        jit_compile: off by default (the eigendecomposition under XLA is not relied on).
    """

    def __init__(
        self,
        learning_rate=0.001,
        block_size: int = 128,
        start_preconditioning_step: int = 100,
        preconditioning_compute_steps: int = 10,
        matrix_epsilon: float = 1e-6,
        beta2: float = 1.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        max_preconditioner_dim: int = 4096,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        jit_compile=False,
        name="Shampoo",
        **kwargs,
    ):
        super().__init__(name=name, weight_decay=weight_decay, clipnorm=clipnorm, clipvalue=clipvalue,
                         global_clipnorm=global_clipnorm, use_ema=use_ema, ema_momentum=ema_momentum,
                         ema_overwrite_frequency=ema_overwrite_frequency, jit_compile=jit_compile, **kwargs)
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if int(start_preconditioning_step) < 0:
            raise ValueError(f"start_preconditioning_step must be >= 0, got {start_preconditioning_step}")
        if int(preconditioning_compute_steps) < 1:
            raise ValueError(f"preconditioning_compute_steps must be >= 1, got {preconditioning_compute_steps}")
        if not matrix_epsilon >= 0:
            raise ValueError(f"matrix_epsilon must be >= 0, got {matrix_epsilon}")
        if not 0.0 < beta2 <= 1.0:
            raise ValueError(f"beta2 must be in (0, 1], got {beta2}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if int(max_preconditioner_dim) < 1:
            raise ValueError(f"max_preconditioner_dim must be >= 1, got {max_preconditioner_dim}")
        if initial_accumulator_value < 0:
            raise ValueError(f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}")
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.block_size = int(block_size)
        self.start_preconditioning_step = int(start_preconditioning_step)
        self.preconditioning_compute_steps = int(preconditioning_compute_steps)
        self.matrix_epsilon = float(matrix_epsilon)
        self.beta2 = float(beta2)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.max_preconditioner_dim = int(max_preconditioner_dim)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    # ---- state ------------------------------------------------------------------------------------
    def layout(self, variable) -> Optional[BlockLayout]:
        """The blocks of `variable`, None when it steps with AdaGrad alone."""
        return block_layout(variable.shape, self.block_size, self.max_preconditioner_dim)

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._accumulators = []
        self._momenta = []
        self._left_statistics, self._right_statistics = [], []
        self._left_roots, self._right_roots = [], []
        self._preconditioner_index = {}  # var key → position in the four lists above (preconditioned variables)
        accumulator_init = tf.keras.initializers.Constant(self.initial_accumulator_value)
        for var in var_list:
            self._accumulators.append(self.add_variable_from_reference(
                var, "accumulator", initial_value=accumulator_init(shape=var.shape, dtype=var.dtype)))
            if self.momentum > 0:
                self._momenta.append(self.add_variable_from_reference(var, "momentum"))
            layout = self.layout(var)
            if layout is None:
                continue
            self._preconditioner_index[self._var_key(var)] = len(self._left_statistics)
            blocks = [layout.num_row_blocks, layout.num_col_blocks]
            with tf.distribute.get_strategy().extended.colocate_vars_with(var):  # as add_variable_from_reference
                self._left_statistics.append(self.add_variable(
                    blocks + [layout.block_rows] * 2, tf.float64, name=f"shampoo_left_statistics/{var._shared_name}"))
                self._right_statistics.append(self.add_variable(
                    blocks + [layout.block_cols] * 2, tf.float64, name=f"shampoo_right_statistics/{var._shared_name}"))
            for roots, name, side in ((self._left_roots, "shampoo_left_root", layout.block_rows),
                                      (self._right_roots, "shampoo_right_root", layout.block_cols)):
                roots.append(self.add_variable_from_reference(
                    var, name, initial_value=tf.eye(side, batch_shape=blocks, dtype=var.dtype)))

    def is_preconditioned(self, variable) -> bool:
        """Whether `variable` steps with Shampoo (else with AdaGrad alone); after `build`."""
        return self._var_key(variable) in self._preconditioner_index

    def slots(self, variable) -> dict:
        """The optimizer variables of `variable`: accumulator (and momentum), and for a preconditioned
        one left/right statistics and roots."""
        key = self._var_key(variable)
        out = {"accumulator": self._accumulators[self._index_dict[key]]}
        if self.momentum > 0:
            out["momentum"] = self._momenta[self._index_dict[key]]
        if key in self._preconditioner_index:
            i = self._preconditioner_index[key]
            out.update(left_statistics=self._left_statistics[i], right_statistics=self._right_statistics[i],
                       left_root=self._left_roots[i], right_root=self._right_roots[i])
        return out

    # ---- the step ---------------------------------------------------------------------------------
    def update_step(self, gradient, variable):
        lr = tf.cast(self.learning_rate, variable.dtype)
        key = self._var_key(variable)
        accumulator = self._accumulators[self._index_dict[key]]
        preconditioned = key in self._preconditioner_index
        if isinstance(gradient, tf.IndexedSlices):
            if not preconditioned and self.momentum == 0:  # Keras Adagrad's sparse update
                accumulator.scatter_add(tf.IndexedSlices(gradient.values * gradient.values, gradient.indices))
                denominator = tf.sqrt(tf.gather(accumulator, gradient.indices) + self.epsilon)
                variable.scatter_add(tf.IndexedSlices(-lr * gradient.values / denominator, gradient.indices))
                return
            gradient = tf.convert_to_tensor(gradient)
        accumulator.assign_add(gradient * gradient)
        update = lr * gradient / tf.sqrt(accumulator + self.epsilon)  # A, exactly as Keras Adagrad's step
        if preconditioned:
            update = self._grafted_update(gradient, update, variable, self._preconditioner_index[key])
        if self.momentum > 0:
            velocity = self._momenta[self._index_dict[key]]
            velocity.assign(self.momentum * velocity + update)
            update = self.momentum * velocity + update if self.nesterov else velocity
        variable.assign_sub(update)

    def _grafted_update(self, gradient, adagrad_update, variable, index):
        """Updates the statistics (and, on schedule, the roots) of a preconditioned variable and
        returns its update: AdaGrad's during the warm-up, then the grafted Shampoo direction."""
        layout = self.layout(variable)
        blocks = to_blocks(tf.reshape(gradient, [layout.rows, layout.cols]), layout)
        left_statistics, right_statistics = self._left_statistics[index], self._right_statistics[index]
        left_root, right_root = self._left_roots[index], self._right_roots[index]
        wide = tf.cast(blocks, tf.float64)
        for statistics, outer in ((left_statistics, tf.matmul(wide, wide, transpose_b=True)),
                                  (right_statistics, tf.matmul(wide, wide, transpose_a=True))):
            if self.beta2 == 1.0:
                statistics.assign_add(outer)
            else:
                statistics.assign(self.beta2 * statistics + (1.0 - self.beta2) * outer)
        step = self.iterations
        start = tf.constant(self.start_preconditioning_step, step.dtype)
        preconditioning = step >= start
        due = preconditioning & tf.equal((step - start) % self.preconditioning_compute_steps, 0)

        def recompute_roots():
            for root, statistics in ((left_root, left_statistics), (right_root, right_statistics)):
                root.assign(tf.cast(inverse_pth_root(statistics, ROOT_EXPONENT, self.matrix_epsilon), root.dtype))
            return tf.constant(True)

        tf.cond(due, recompute_roots, lambda: tf.constant(False))

        def grafted():
            direction = tf.matmul(tf.matmul(left_root, blocks), right_root)
            direction = tf.reshape(from_blocks(direction, layout), tf.shape(adagrad_update))
            scale = tf.math.divide_no_nan(tf.norm(adagrad_update), tf.norm(direction))
            return scale * direction

        return tf.cond(preconditioning, grafted, lambda: adagrad_update)

    def finalize_variable_values(self, var_list):
        """Writes the EMA into the variables this optimizer steps, and leaves the others: it may share
        a model with another optimizer (the ranker's embedding tables step with Adagrad,
        `models.ranker`), and Keras's `fit` passes every trainable variable."""
        own = getattr(self, "_index_dict", {})
        super().finalize_variable_values([v for v in var_list if self._var_key(v) in own])

    def get_config(self):
        config = super().get_config()
        config.update({
            "learning_rate": self._serialize_hyperparameter(self._learning_rate),
            "block_size": self.block_size,
            "start_preconditioning_step": self.start_preconditioning_step,
            "preconditioning_compute_steps": self.preconditioning_compute_steps,
            "matrix_epsilon": self.matrix_epsilon,
            "beta2": self.beta2,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "max_preconditioner_dim": self.max_preconditioner_dim,
            "initial_accumulator_value": self.initial_accumulator_value,
            "epsilon": self.epsilon,
        })
        return config
