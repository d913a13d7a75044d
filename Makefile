# Two commands on a fresh machine:
#   make run    set up and start the example app on SQLite, with the simulated (offline) Stripe
#   make test   set up and run the whole test suite
# Set CREDITS_TEST_POSTGRES_URL / CREDITS_TEST_MARIADB_URL to include those databases (see README).

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install run test lint reliability

# `make run` needs only the package and the example app; tests, lint and benchmarks need the rest.
$(BIN)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[example]'
	touch $@

$(BIN)/.installed: pyproject.toml $(BIN)/.installed-run
	$(BIN)/pip install --quiet -e '.[test,example,bench]'
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed-run
	$(BIN)/flask --app example_app db upgrade --directory migrations
	$(BIN)/flask --app example_app run --debug

lint: install
	$(BIN)/ruff check flask_credits example_app tests
	$(BIN)/ruff format --check flask_credits
	$(BIN)/mypy flask_credits
	$(BIN)/lint-imports

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

# The long load and fault run of docs/reliability.md (PostgreSQL and MariaDB must be configured as for
# `make test`); each scenario prints one JSON line of figures. RELIABILITY_SECONDS per load scenario.
RELIABILITY_SECONDS ?= 300
reliability: install
	CREDITS_RELIABILITY_SECONDS=$(RELIABILITY_SECONDS) CREDITS_TEST_REQUIRE_DATABASES=1 \
		$(BIN)/pytest -m slow -s tests/test_load.py tests/test_faults.py $(PYTEST_ARGS)
