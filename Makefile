# Set-up and everyday commands. `make demo` and `make test` create .venv on first use
# (Python 3.10: TFX 1.15 needs <3.11) and install the package with the pinned stack; later runs
# reuse it (the stamp file .venv/.installed is newer than setup.py and constraints.txt).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?=
DEMO_FLAGS ?=
DEMO_OUT ?= cascade_output

# Python 3.10: `python3.10` on PATH if it runs (a pyenv shim only runs with 3.10 selected, as
# .python-version does here), else pyenv's own 3.10 interpreter.
PYTHON310 := $(shell \
  if python3.10 -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then command -v python3.10; \
  elif command -v pyenv >/dev/null 2>&1 && [ -x "$$(pyenv root)/versions/3.10.13/bin/python3" ]; then echo "$$(pyenv root)/versions/3.10.13/bin/python3"; \
  elif command -v pyenv >/dev/null 2>&1 && ls -d "$$(pyenv root)"/versions/3.10.*/bin/python3 >/dev/null 2>&1; then ls -d "$$(pyenv root)"/versions/3.10.*/bin/python3 | tail -n 1; \
  fi)

.PHONY: demo test test-fast install bench clean help

help:
	@echo "make demo       run the local TFX pipeline on built-in synthetic data"
	@echo "make test       run the whole test suite"
	@echo "make test-fast  run the tests not marked slow"
	@echo "make bench      rerun every figure of BENCHMARKS.md (about 5 h) and draw its plots"

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@if [ -z "$(PYTHON310)" ]; then echo "error: Python 3.10 not found: install it (e.g. 'pyenv install 3.10.13' or 'apt-get install python3.10 python3.10-venv')" >&2; exit 1; fi
	@[ -x $(PY) ] || { echo "creating $(VENV) with $(PYTHON310)"; "$(PYTHON310)" -m venv $(VENV); }
	@echo "installing cascade-ranking and its pinned stack into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install -c constraints.txt -e '.[test]' > $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cascade run --output-dir $(DEMO_OUT) --serve-check $(DEMO_FLAGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_FLAGS)

# Every figure of BENCHMARKS.md, then its tables and plots (about 5 h on 2 cores; run on a quiet
# machine: the performance figures are ratios, but they still share the machine with nothing else).
BENCH_OUT ?= bench/results
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) bench/pipeline_runs.py --runs 3 --json $(BENCH_OUT)/pipeline_runs.json
	tmp=$$(mktemp -d) && $(VENV)/bin/cascade run --output-dir $$tmp/run > $$tmp/run.log 2>&1 \
	  && $(PY) bench/ranker_variants.py --run $$tmp/run --json $(BENCH_OUT)/ranker_variants.json \
	  && $(PY) bench/tfma_slices.py --output-dir $$tmp/run --json $(BENCH_OUT)/tfma_slices.json && rm -rf $$tmp
	$(PY) bench/ranking_ablations.py --json $(BENCH_OUT)/ranking_ablations.json
	$(PY) bench/data_sampling.py --json $(BENCH_OUT)/data_sampling.json
	$(PY) bench/cascade_lcron.py --json $(BENCH_OUT)/cascade_lcron.json
	$(PY) bench/ranking_speed.py --json $(BENCH_OUT)/ranking_speed.json
	$(PY) bench/cross_stack_cost.py
	$(PY) bench/concurrent_nodes.py --teacher-before-gate --json $(BENCH_OUT)/concurrent_nodes.json
	$(PY) bench/stage_throughput.py --json $(BENCH_OUT)/stage_throughput.json
	$(PY) bench/component_throughput.py --requests 1000 --repeats 2 --json $(BENCH_OUT)/component_throughput.json
	$(PY) bench/demo_wall.py --json $(BENCH_OUT)/demo_wall.json
	$(PY) bench/growth.py --multiples 1 4 --json $(BENCH_OUT)/growth.json
	$(PY) bench/growth.py --multiples 4 --beam-mode in_process --json $(BENCH_OUT)/growth_4x_in_process.json
	$(PY) bench/ranking_ablations.py --datasets synthetic --only baseline,+SmeLU --smelu smelu:0.1 --json $(BENCH_OUT)/ranking_ablations_smelu_beta0.1.json
	$(PY) bench/cascade_lcron.py --datasets movielens --methods lcron,bce --drop_train_lists_without_gt --json $(BENCH_OUT)/cascade_lcron_movielens_drop_no_gt.json
	$(PY) bench/calibration_check.py --json $(BENCH_OUT)/calibration_check.json
	$(PY) bench/calibration_check.py --bias-alpha 0.01 0.001 --only-extra --json $(BENCH_OUT)/calibration_check_alpha.json
	$(PY) bench/obd_calibration.py --json $(BENCH_OUT)/obd_calibration.json
	$(PY) bench/continuous_training.py --variants warm1 warm2 window2 window2x3 --json $(BENCH_OUT)/continuous_training.json
	tmp=$$(mktemp -d) && $(VENV)/bin/cascade run --output-dir $$tmp/run > $$tmp/run.log 2>&1 \
	  && $(PY) bench/distributed_training.py --run $$tmp/run --part speed --json $(BENCH_OUT)/distributed_speed.json \
	  && $(PY) bench/distributed_training.py --run $$tmp/run --part capacity --cap-gb 4 --ps 2 --start-rows 2097152 \
	       --json $(BENCH_OUT)/distributed_capacity.json && rm -rf $$tmp
	$(PY) bench/retrieval_index.py --json $(BENCH_OUT)/retrieval_index.json
	$(PY) bench/retrieval_index.py --clusters 1 --json $(BENCH_OUT)/retrieval_index_noise.json
	tmp=$$(mktemp -d) && $(VENV)/bin/cascade search --cost-target 0.85,0.9,0.95 --out $$tmp/search --requests 10000 \
	       --set synthetic.preset=hard > $$tmp/search.log 2>&1 \
	  && $(PY) bench/factory_floor_table.py --seeds 0 1 2 --requests 10000 --searched $$tmp/search --equal-wall \
	       --json $(BENCH_OUT)/factory_floor_table.json && rm -rf $$tmp
	$(PY) bench/report.py --results $(BENCH_OUT) --plots

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
