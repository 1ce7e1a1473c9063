# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test bench clean

# The editable install is made importable from any folder by a path file
# (see scripts/source_path.py); setuptools' notice about exactly that
# problem is then noise, and silenced.
$(STAMP): pyproject.toml scripts/source_path.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python scripts/source_path.py
	touch $@

install: $(STAMP)

demo: $(STAMP)
	BIN=$(BIN) bash scripts/demo.sh

# Chromium for the browser test, where this machine allows (see the script).
browser:
	bash scripts/install_browser.sh

test: $(STAMP) browser
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_index.py sample_data/labelled --encoder efficientnet-lite0

clean:
	rm -rf $(VENV) demo-index
