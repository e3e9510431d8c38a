# make demo — set up (once) and run the offline CPU demo.   make test — set up (once) and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m construct.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m construct.bench
