"""The retrieval stage's top-k index: exact BruteForce (the default) or approximate ScaNN.

`build_index` builds the index an `IndexConfig` names over the corpus's item embeddings, for both
retrieval exporters (`models.retrieval.export_retrieval` and the Trainer's
`models.trainers.retrieval.export`); the pipeline config chooses it as `retrieval.index`
(`cascade run --set retrieval.index=scann`).

brute_force   `tfrs.layers.factorized_top_k.BruteForce`: s_j = u·v_j for every item j of the
              corpus, then the exact top k (one [N, I] matmul and `tf.math.top_k`).
scann         `tfrs.layers.factorized_top_k.ScaNN` over ScaNN's TensorFlow ops (the `scann` package,
              `pip install 'cascade-ranking[scann]'`): Guo et al., "Accelerating Large-Scale
              Inference with Anisotropic Vector Quantization", ICML 2020. Three steps per query u:
    1. partition: the items are split into L leaves by k-means (a tree of one level); a query
       searches only the S leaves whose centres c score highest by u·c;
    2. score: the items of those leaves are scored by u·ṽ_j, ṽ_j their product-quantized code
       (the d dimensions cut into blocks of `scann_dims_per_block`, 16 centres per block, scored
       through lookup tables). The codes minimise ScaNN's anisotropic (score-aware) loss
           ℓ(v, ṽ) = h_∥ ‖r_∥‖² + h_⊥ ‖r_⊥‖²,   r = v − ṽ split parallel / orthogonal to v:
       the residual parallel to v changes u·v the most for the queries that score v high, so it
       weighs η = h_∥ / h_⊥ = (d − 1)·T² / (‖v‖² − T²) times more (Guo et al. Theorem 3.4, as ScaNN
       computes it per item from its threshold T). T is absolute in ScaNN; here it is set from
       the target ratio η₀ = `scann_avq_ratio` at the 5 % quantile q of the item norms:
           T = q·√(η₀ / (d − 1 + η₀)),
       so the 95 % of the items with a norm of at least q get η ≤ η₀ whatever the embeddings'
       scale (a smaller norm weighs more). η₀ = 4 is the anisotropy
       of ScaNN's recommended T = 0.2 for unit-norm vectors of d = 100 (η = 4.1, Guo et al.'s
       GloVe setting); η₀ = 0: the plain squared error (ScaNN's NaN threshold);
    3. reorder: the R best of step 2 are rescored exactly, u·v_j, and the top k of them returned.
The parameters, 0 meaning automatic (for a corpus of N items and the index's k):
    L = scann_num_leaves      or round(√N)                 (ScaNN's rule of thumb)
    R = scann_reorder         or min(N, 10·k)
    S = scann_leaves_to_search or min(L, max(⌈L/5⌉, ⌈40·R·L/N⌉))
        (a fifth of the leaves, and at least enough of them to hold 40·R items, 40,000 at k = 100,
        for step 2 to choose the R from: below 200·R items more than a fifth of the corpus is
        scanned, below 40·R all of it, where the quantized scan still costs less than the exact
        one). Tuned on clustered Gaussian embeddings, d = 32 (bench/retrieval_index.py): recall@100
        against BruteForce 0.997 at 2·10^4 items, 0.979 at 10^5, 0.987 at 10^6; 0.9998 for the demo
        pipeline's model (9,984 items, 1,000 eval requests).

What is written here: the choice between the two layers, the automatic parameters, the save
options and the loading of ScaNN's ops. The partitioning, the quantization and the search are
ScaNN's (TFRS 0.7.3 calls `scann.scann_ops.builder`); one thing of TFRS's layer is replaced,
its searcher-building closure, which does not pass ScaNN's `anisotropic_quantization_threshold`
(without it the codebooks are trained on the plain squared error): `AnisotropicScaNN` builds the
same ScaNN config (tree → score_ah → reorder) with the threshold.

Saving and loading. ScaNN's searcher is a TensorFlow resource made by custom ops of the namespace
`Scann` (`Scann>TensorsToScann`, `Scann>ScannSearchBatched`, ...): `tf.saved_model.save` refuses
ops of a namespace it is not told of, so a ScaNN index is saved with `save_options(index)`
(`namespace_whitelist=["Scann"]`; a BruteForce export gets no options, as before), and a process
can only load such a SavedModel after `import scann` has registered the ops; every loader of a
retrieval model in this package goes through `load_saved_model` (`load_ops`), which imports scann
when the model needs it and otherwise fails with one line naming the fix.

TF Serving: a stock TF Serving build (the `tensorflow/serving` image, `tensorflow_model_server`)
lacks ScaNN's custom ops, so it cannot load a ScaNN export (the error is that of a TensorFlow
process that has not imported scann: "Op type not registered 'Scann>TensorsToScann'"). Serve it with a TF Serving binary linked with ScaNN's ops (ScaNN ships a
build recipe, `scann/tf_serving` in google-research, and TFRS points to the `google/tf-serving-scann`
image), or keep the default `brute_force` index for a stock server, or score outside TF Serving
from the `query_embedding` and `item_embeddings` signatures, which use no ScaNN op.
"""
import dataclasses
import functools
import math
import os
import uuid
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

INDEXES = ("brute_force", "scann")
OPS_NAMESPACE = "Scann"
INSTALL_HINT = "pip install 'cascade-ranking[scann]'"
DEFAULT_AVQ_RATIO = 4.0
SCORED_PER_REORDERED = 40  # the quantized scan scores at least 40·R items (module docstring, S)
MIN_ITEMS = 16  # ScaNN's quantizer trains 16 centres per block (fewer items: an error; one item: a crash)
NORM_QUANTILE = 0.05  # q of the docstring: the items above it get an anisotropy of at most scann_avq_ratio


class ScannNotInstalled(ImportError):
    """ScaNN's ops are needed (a `scann` index, or a SavedModel that holds one) and `scann` is not
    installed; the message is one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Which index the retrieval export builds (`INDEXES`) and ScaNN's parameters (module
    docstring; 0 = automatic). The field names are `RetrievalTrainerConfig`'s."""

    index: str = "brute_force"
    scann_num_leaves: int = 0  # L, k-means leaves of the partition; 0: round(√N)
    scann_leaves_to_search: int = 0  # S, leaves searched per query; 0: min(L, max(⌈L/5⌉, ⌈40·R·L/N⌉))
    scann_reorder: int = 0  # R, candidates rescored exactly; 0: min(N, 10·k); else >= k
    scann_dims_per_block: int = 2  # dimensions per product-quantization block (16 centres each)
    scann_avq_ratio: float = DEFAULT_AVQ_RATIO  # η₀ = h_∥/h_⊥ of the anisotropic loss; 0: plain squared error

    def __post_init__(self):
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {', '.join(map(repr, INDEXES))}, got {self.index!r}")
        for name in ("scann_num_leaves", "scann_leaves_to_search", "scann_reorder"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: automatic), got {getattr(self, name)!r}")
        if not isinstance(self.scann_dims_per_block, int) or self.scann_dims_per_block < 1:
            raise ValueError(f"scann_dims_per_block must be an integer >= 1, got {self.scann_dims_per_block!r}")
        if not (isinstance(self.scann_avq_ratio, (int, float)) and 0 <= self.scann_avq_ratio < math.inf):
            raise ValueError(f"scann_avq_ratio must be a number >= 0 (0: no anisotropic loss), got {self.scann_avq_ratio!r}")
        if self.scann_num_leaves and self.scann_leaves_to_search > self.scann_num_leaves:
            raise ValueError(f"scann_leaves_to_search {self.scann_leaves_to_search} exceeds scann_num_leaves "
                             f"{self.scann_num_leaves}")

    def scann_parameters(self, corpus_size: int, k: int) -> dict:
        """{"num_leaves": L, "num_leaves_to_search": S, "num_reordering_candidates": R} for a corpus
        of `corpus_size` items and top `k` (module docstring), each capped at what the corpus has."""
        n = int(corpus_size)
        if n < MIN_ITEMS:
            raise ValueError(f"the 'scann' index needs at least {MIN_ITEMS} items (16 quantization centres per "
                             f"block), the corpus has {n}: use index 'brute_force'")
        leaves = min(self.scann_num_leaves or max(1, round(math.sqrt(n))), n)
        reorder = min(self.scann_reorder or 10 * k, n)
        if reorder < k:
            raise ValueError(f"scann_reorder {self.scann_reorder} is below the index's top k {k}")
        search = self.scann_leaves_to_search or max(math.ceil(leaves / 5), math.ceil(SCORED_PER_REORDERED * reorder * leaves / n))
        return {"num_leaves": leaves, "num_leaves_to_search": min(search, leaves), "num_reordering_candidates": reorder}

    def avq_threshold(self, embeddings: np.ndarray) -> float:
        """ScaNN's absolute threshold T = q·√(η₀ / (d − 1 + η₀)) for the items `embeddings` [N, d]
        (q the 5 % quantile of their norms); NaN (no anisotropic loss) when η₀ = 0."""
        if not self.scann_avq_ratio:
            return float("nan")
        d = embeddings.shape[1]
        q = float(np.quantile(np.linalg.norm(embeddings, axis=1), NORM_QUANTILE))
        return q * math.sqrt(self.scann_avq_ratio / (d - 1 + self.scann_avq_ratio))


def require_scann():
    """Imports `scann` (registering its TensorFlow ops); `ScannNotInstalled` (one line) when absent."""
    try:
        import scann  # noqa: F401  (registers the Scann>* ops)
    except ImportError as e:
        raise ScannNotInstalled(f"the retrieval index 'scann' needs the scann package ({e}): {INSTALL_HINT}") from None
    return scann


class AnisotropicScaNN(tfrs.layers.factorized_top_k.ScaNN):
    """TFRS's ScaNN layer (dot product) whose searcher is built with ScaNN's anisotropic quantization
    threshold `avq_threshold` (`score_ah(..., anisotropic_quantization_threshold=T)`, absolute; NaN:
    none); otherwise TFRS's layer as it is: the same tree → score_ah → reorder config and the same
    unique shared name per searcher."""

    def __init__(self, query_model, k: int, num_leaves: int, num_leaves_to_search: int,
                 num_reordering_candidates: int, dimensions_per_block: int = 2,
                 avq_threshold: float = float("nan"), name: Optional[str] = None):
        super().__init__(query_model, k=k, distance_measure="dot_product", num_leaves=num_leaves,
                         num_leaves_to_search=num_leaves_to_search, dimensions_per_block=dimensions_per_block,
                         num_reordering_candidates=num_reordering_candidates, name=name)
        # TFRS 0.7.3 keeps its builder in this closure, called by `index()`.
        self._build_searcher = functools.partial(
            self._anisotropic_searcher, num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
            num_reordering_candidates=num_reordering_candidates, dimensions_per_block=dimensions_per_block,
            avq_threshold=avq_threshold)

    def _anisotropic_searcher(self, candidates, num_leaves, num_leaves_to_search, num_reordering_candidates,
                              dimensions_per_block, avq_threshold):
        from scann.scann_ops.py import scann_ops
        builder = (scann_ops.builder(db=candidates, num_neighbors=self._k, distance_measure="dot_product")
                   .tree(num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
                         training_iterations=self._training_iterations)
                   .score_ah(dimensions_per_block, anisotropic_quantization_threshold=avq_threshold)
                   .reorder(num_reordering_candidates))
        return builder.build(shared_name=f"{self.name}/{uuid.uuid4()}")


def build_index(query_model, embeddings: np.ndarray, identifiers: tf.Tensor, k: int,
                config: Optional[IndexConfig] = None) -> tfrs.layers.factorized_top_k.TopK:
    """The top-`k` index `config` names (default: BruteForce) over `embeddings` [N, d] (float32)
    labelled `identifiers` [N], querying through `query_model` (None: the index takes query
    embeddings). `k` is capped at N. A `scann` index without the scann package: `ScannNotInstalled`."""
    config = config or IndexConfig()
    embeddings = np.asarray(embeddings, np.float32)
    k = min(int(k), int(embeddings.shape[0]))
    if config.index == "brute_force":
        index = tfrs.layers.factorized_top_k.BruteForce(query_model, k=k)
    else:
        require_scann()
        index = AnisotropicScaNN(query_model, k=k, dimensions_per_block=config.scann_dims_per_block,
                                 avq_threshold=config.avq_threshold(embeddings),
                                 **config.scann_parameters(embeddings.shape[0], k))
    return index.index(tf.constant(embeddings), identifiers=identifiers)


def save_options(index) -> Optional[tf.saved_model.SaveOptions]:
    """What `tf.saved_model.save` needs for `index`: ScaNN's op namespace allowed for a ScaNN
    index, None (TF's defaults, the SavedModel as before) for BruteForce."""
    if isinstance(index, tfrs.layers.factorized_top_k.ScaNN):
        return tf.saved_model.SaveOptions(namespace_whitelist=[OPS_NAMESPACE])
    return None


def uses_scann_ops(model_dir: str) -> bool:
    """Whether the SavedModel in `model_dir` calls an op of ScaNN's namespace (`Scann>…`), read from
    its saved_model.pb (graph and function library) without loading it."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(model_dir, "saved_model.pb")
    if not tf.io.gfile.exists(path):
        return False
    saved = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as f:
        saved.ParseFromString(f.read())
    prefix = OPS_NAMESPACE + ">"
    for graph in saved.meta_graphs:
        nodes = list(graph.graph_def.node)
        for function in graph.graph_def.library.function:
            nodes.extend(function.node_def)
        if any(node.op.startswith(prefix) for node in nodes):
            return True
    return False


def load_ops(model_dir: str) -> bool:
    """Registers ScaNN's ops in this process when the SavedModel in `model_dir` needs them (True), or
    does nothing (False). A model that needs them without scann installed: `ScannNotInstalled`."""
    if not uses_scann_ops(model_dir):
        return False
    try:
        require_scann()
    except ScannNotInstalled:
        raise ScannNotInstalled(f"{model_dir} holds a ScaNN index, whose ops need the scann package: "
                                f"{INSTALL_HINT}") from None
    return True


def load_saved_model(model_dir: str):
    """`tf.saved_model.load(model_dir)` after `load_ops(model_dir)`: how this package loads a model
    that may hold a ScaNN index."""
    load_ops(model_dir)
    return tf.saved_model.load(model_dir)
