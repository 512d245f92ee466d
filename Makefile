# Two commands on a fresh machine: `make run` and `make test`. Both install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: install lint run test migrate bench bench-quick bench-tools bytecode chaos clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The whole service on embedded defaults: SQLite, the filesystem broker, the local SMTP sink.
run: export DJANGO_DEBUG = true
run: export EMAIL_HOST = 127.0.0.1
run: export EMAIL_PORT = 1025
run: export EMAIL_USE_TLS = false
run: export EMAIL_USE_SSL = false
run: export PATH := $(CURDIR)/$(BIN):$(PATH)
run: install
	python manage.py migrate --noinput
	honcho -f Procfile.dev start

# ruff, configured in pyproject.toml: the lint rules and the formatter, over the whole tree.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# 300 submissions while the broker goes away for 30 s and a worker is killed (needs PostgreSQL
# and RabbitMQ on 127.0.0.1); prints accepted, delivered, lost, duplicated, longest delay.
chaos: install bytecode
	$(BIN)/python bench/chaos.py

# The service against baselines measured in the same run (needs PostgreSQL, RabbitMQ and Redis on
# 127.0.0.1, and wrk; makes var/peers-venv for the side-by-side peers); writes bench/results.json and
# prints the Markdown tables. See bench/README.md.
bench: install bench-tools bytecode
	$(BIN)/python bench/run.py

# A smoke run in under two minutes: fails only if the stack does not come up or a measurement errors.
bench-quick: install bench-tools bytecode
	$(BIN)/python bench/run.py --quick --json var/bench-quick.json

# The project's modules compiled ahead, as the image does (Dockerfile): where PYTHONDONTWRITEBYTECODE
# is set, as here and in the image, every process start would compile them again. pip compiles what
# it installs, the peers' virtualenv included.
bytecode: install
	$(BIN)/python -m compileall -q email_service medcor_backend2 bench

bench-tools:
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)

clean:
	rm -rf var/ db.sqlite3 .pytest_cache
