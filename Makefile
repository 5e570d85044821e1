# The two commands of the README: `make demo` runs the main job, `make test` the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: venv demo test bench chaos soak kafka-start kafka-stop kafka-status services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

kafka-start:
	deploy/local/kafka.sh start

kafka-stop:
	deploy/local/kafka.sh stop

kafka-status:
	deploy/local/kafka.sh status

services:
	deploy/local/services.sh

demo: venv kafka-start
	$(BIN)/supportlens demo

test: venv services
	$(BIN)/python -m pytest

# Throughput figures, each measured beside its baseline in the same run (not part of `make test`).
bench: venv kafka-start
	$(BIN)/python bench/correlation.py
	$(BIN)/python bench/clickhouse.py
	$(BIN)/python bench/incidents.py

# Every fault-injection scenario at full length: broker down 30 s, ClickHouse refusing 60 s, kills.
chaos: venv services
	$(BIN)/python -m pytest -m chaos --chaos-full

# 15 minutes of warm-up, then 30 judged, at a fixed rate: memory over time, consumer lag, end-to-end latency.
soak: venv kafka-start
	$(BIN)/python bench/soak.py --minutes 30

clean:
	rm -rf $(VENV) out .pytest_cache
