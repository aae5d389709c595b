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

# the shipped recipe: a robust teacher (generic augmentation, outlier exposure, 48 px then 64 px) and the
# edge_cnn_fc student distilled from it with outlier exposure (+ its alpha=0 ablation), both calibrated
MODELS_ARGS ?= --robust --outlier-weight 0.5 --low-res-size 48 --low-res-epochs 2 --input-size 64 --epochs 1.5 \
               --lr 3e-3 --student edge_cnn_fc --student-outlier-weight 0.5

models: setup
	$(VENV)/bin/edge-tl train-default $(MODELS_ARGS)

clean:
	rm -rf $(VENV) build install log .pytest_cache .ruff_cache *.egg-info demo_out bench/results/tmp
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
