# Two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv (pip, Python 3.11) when it is missing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[serve,nlp,dev,deploy,qdrant]'
	touch $(STAMP)

demo: venv
	$(BIN)/tbps demo

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/eval_metrics.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
