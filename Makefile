# Two commands on a fresh machine: `make run` and `make test`. Both install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: install run test migrate bench bench-quick chaos clean

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
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

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# 300 submissions while the broker goes away for 30 s and a worker is killed (needs PostgreSQL
# and RabbitMQ on 127.0.0.1); prints accepted, delivered, lost, duplicated, longest delay.
chaos: install
	$(BIN)/python bench/chaos.py

clean:
	rm -rf var/ db.sqlite3 .pytest_cache
