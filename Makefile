# make run   - install into .venv if needed, then serve on 127.0.0.1:8787 (data in ./data)
# make test  - install dev tools if needed, lint and type-check, then the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-dev run test lint format bench clean screenshots

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.created:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "qp-server needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@touch $@

$(VENV)/.installed: $(VENV)/.created requirements.txt pyproject.toml
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $@

run: install
	$(BIN)/python server.py

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# pytest-xdist, each test module whole on one worker (its module-scoped servers start
# once). Three workers on the machine's two cores: with two, the cores stood idle 40 % of
# the time, the tests waiting on processes and sockets. `make test TEST_WORKERS=0` runs it
# in one process.
TEST_WORKERS ?= 3
test: install-dev lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The operator's page in Debian's Chromium, each view photographed into tests/artifacts/.
screenshots: install-dev
	$(BIN)/python -m pytest -q tests/test_admin_page.py
	@ls tests/artifacts/admin-*.png

bench: install-dev
	$(BIN)/python bench/all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
