# The two set-up commands of the README: `make main` (tiny NSA pretraining on the CPU) and `make test`.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup main test test-slow test-all
setup:
	@bash tools/setup_env.sh

main: setup
	@bash tools/main_job.sh

test: setup
	$(PY) -m pytest -q --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"
