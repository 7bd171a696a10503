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
]

setuptools.setup(
    name="cascade-ranking",
    version="0.1.0",
    description=(
        "Production Keras models for retrieval, pre-ranking and ranking, "
        "run as a TFX pipeline and exported for TF Serving."
    ),
    python_requires=">=3.9,<3.11",
    packages=setuptools.find_packages(include=["models*", "components*", "pipelines*", "datasources*", "schema*"]),
    package_data={"schema": ["*.pbtxt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==9.2.0"]},
    entry_points={"console_scripts": ["cascade=pipelines.cli:main"]},
)
