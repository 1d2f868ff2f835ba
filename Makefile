# The course's commands. `make course` runs every notebook end to end; `make test` runs the
# tests. Both set up what they need on first use (see scripts/setup_env.sh).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.course-setup

.PHONY: setup course test unit notebooks lab chat bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt scripts/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

# Every notebook, full mode, on the default model; executed notebooks are written in place
# and figures to outputs/figures/.
course: setup
	COURSE_FAST=0 $(PY) -m companion.course run

# Unit tests on tiny models, then every notebook executed under nbval in fast mode.
test: setup
	COURSE_FAST=1 $(PY) -m pytest tests notebooks --nbval-lax --durations=10 -q

unit: setup
	COURSE_FAST=1 $(PY) -m pytest tests -q

notebooks: setup
	COURSE_FAST=1 $(PY) -m pytest notebooks --nbval-lax -q

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Chat in the terminal with the default model; pass options with ARGS, e.g.
# make chat ARGS="--delta ch1/lora"   or   make chat ARGS=--web
chat: setup
	$(PY) -m companion.chat $(ARGS)

bench: setup
	$(PY) benchmarks/notebook_times.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
