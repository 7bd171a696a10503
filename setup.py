"""Packaging for cascade-ranking: TFX models for every stage of a recommendation cascade."""
import setuptools

# The stack of DESIGN §2, pinned. The full transitive set is pinned in constraints.txt
# (a verified `pip freeze` for Python 3.10), which the Makefile passes with `-c`.
INSTALL_REQUIRES = [
    "tfx[kfp]==1.15.1",
    "tensorflow==2.15.1",
    "tensorflow-ranking==0.5.5",
    "tensorflow-recommenders==0.7.3",
    "apache-beam[gcp]==2.56.0",
    "matplotlib==3.8.4",  # evaluation plots (calibration, recall@k) written as PNG
    "tqdm==4.70.1",  # the Trainers' epoch progress bars (already in the stack through TFX)
]

SCANN = "scann==1.3.0"  # the release built against TF 2.15

# The repository's top-level folders, installed under `cascade_ranking`.
_SUBPACKAGES = sorted(
    p for p in setuptools.find_packages(include=["models*", "components*", "pipelines*", "datasources*", "schema*"]))

setuptools.setup(
    name="cascade-ranking",
    version="0.1.0",
    description=(
        "Production Keras models for retrieval, pre-ranking and ranking, "
        "run as a TFX pipeline and exported for TF Serving."
    ),
    python_requires=">=3.9,<3.11",
    # One installed package, `cascade_ranking`, so that nothing collides with a user's own `models`
    # or `schema`. The repository keeps the design card's top-level folders; package_dir maps each
    # to a subpackage (`models/` -> `cascade_ranking.models`). `cascade_ranking` itself is an
    # implicit namespace package: it has no folder of its own.
    packages=[f"cascade_ranking.{p}" for p in _SUBPACKAGES],
    package_dir={f"cascade_ranking.{p}": p.replace(".", "/") for p in _SUBPACKAGES},
    package_data={"cascade_ranking.schema": ["*.pbtxt"]},
    install_requires=INSTALL_REQUIRES,
    # scann: the ScaNN retrieval index (`retrieval.index: scann`, models/scann_index.py); its cp310
    # wheel pins tensorflow~=2.15.0. The tests exercise it, so the test extra has it too.
    extras_require={"scann": [SCANN], "test": ["pytest==9.2.0", SCANN]},
    entry_points={"console_scripts": ["cascade=cascade_ranking.pipelines.cli:main"]},
)
