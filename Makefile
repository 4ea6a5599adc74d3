VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test check lint typecheck fmt demo bench clean tools chart-files compiled lock

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The mypyc-compiled modules (setup.py) are rebuilt when a source is newer than its compiled
# module: Python imports the compiled one first.
compiled: $(STAMP)
	@$(PY) -c 'import sys, syncd.runtime as r; sys.exit(bool(r.stale_compiled_modules()))' \
		|| $(PY) -m pip install -q -e .

# promtool (for the alert-rule tests), extracted from Debian's prometheus package
tools:
	bash .ci/tools.sh

test: compiled tools
	$(PY) -m pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: compiled
	$(VENV)/bin/syncd demo

bench: compiled
	$(PY) bench/bench_pii.py
	$(PY) bench/bench_transform.py
	$(PY) bench/bench_e2e.py
	$(PY) bench/bench_budget.py

# The image's hash-locked requirements (deploy/Dockerfile), from pyproject.toml: run after changing
# a dependency (tests/deploy/test_lock.py fails on a stale lock). pip-tools runs in its own venv.
LOCK_VENV := $(VENV)-lock
LOCK := $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
	--no-emit-index-url --no-emit-find-links --allow-unsafe
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || python3 -m venv $(LOCK_VENV)
	test -x $(LOCK_VENV)/bin/pip-compile || $(LOCK_VENV)/bin/pip install -q 'pip-tools>=7.4'
	$(LOCK) --upgrade --output-file deploy/requirements.lock pyproject.toml
	$(LOCK) --upgrade --all-build-deps --only-build-deps \
		--output-file deploy/build-requirements.lock pyproject.toml

# The chart can only read files inside itself: it ships copies of the deploy/ originals.
chart-files:
	cp deploy/alerts/syncd-rules.yml deploy/grafana/syncd.json helm/syncd/files/

clean:
	rm -rf $(VENV) $(LOCK_VENV) .mypy_cache .pytest_cache .ruff_cache build syncd__mypyc.*.so
	find syncd -name '*.so' -delete
