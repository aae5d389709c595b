"""Benchmarks of edge_tl_ros (``python -m bench.run_all [--quick]``); see ``bench/README.md``."""
