# edge_tl_ros developer entry points. Everything runs from .venv (created by `make setup`);
# no activation or ROS sourcing is needed: .venv/bin/python finds rclpy and vision_msgs by itself.
VENV        ?= .venv
PY          := $(VENV)/bin/python
PYTEST_ARGS ?=
# lint only the directories that exist (empty ones are not in git)
LINT_DIRS   := $(wildcard edge_tl_ros test bench launch tools)

.PHONY: setup test demo bench bench-quick lint models clean

setup:
	bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q test $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/edge-tl demo

bench: setup
	$(PY) -m bench.run_all

bench-quick: setup
	$(PY) -m bench.run_all --quick

lint: setup
	$(VENV)/bin/ruff check $(LINT_DIRS)

models: setup
	$(VENV)/bin/edge-tl train-default

clean:
	rm -rf $(VENV) build install log .pytest_cache .ruff_cache *.egg-info demo_out bench/results/tmp
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
