# Two commands on a fresh machine:
#   make run    set up and start the example app on SQLite, with the simulated (offline) Stripe
#   make test   set up and run the whole test suite
# Set CREDITS_TEST_POSTGRES_URL / CREDITS_TEST_MARIADB_URL to include those databases (see README).

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install run test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,example]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/flask --app example_app db upgrade --directory migrations
	$(BIN)/flask --app example_app run --debug

lint: install
	$(BIN)/ruff check flask_credits example_app tests
	$(BIN)/ruff format --check flask_credits
	$(BIN)/mypy flask_credits

test: install
	$(BIN)/pytest $(PYTEST_ARGS)
