# Container image for the Kubeflow V2 pipeline (`cascade compile-kubeflow --image ...`):
# this package and its pinned stack, with schema/ at /pipeline/schema (the default --schema-file).
# Not built in CI here: no Docker engine is available on these machines.
FROM python:3.10-slim
WORKDIR /pipeline
COPY . /pipeline
RUN pip install --no-cache-dir -c constraints.txt -e '.[scann]'
