"""Run the benchmark suite and print a summary table of all results.

    python -m bench.run_all [--quick] [--only NAME ...] [--summary-only] [--results-dir DIR] [--bundle DIR]

Each benchmark runs in its own process (``python -m bench.<name>``) and writes ``<results-dir>/<name>.json``
(+ a PNG); this writes ``summary.json`` beside them. Full suite: about 25 min on 2 cores; ``--quick``
(CI: checks the code works and writes valid results, not speed): about 4 min, into bench/results/quick.
Benchmarks that need trained models or data absent here write ``{"skipped": reason}``.
Exit status 1 if a benchmark failed (crashed or wrote no result).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench import common

BENCHMARKS = ('node_latency', 'overload', 'swap', 'cameras', 'adaptation_interference', 'model_zoo',
              'adaptation', 'adaptation_memory', 'fleet')
REQUIRED = {
    'node_latency': ('p50_ms', 'p99_ms', 'naive_p50_ms', 'speedup_vs_naive', 'drops'),
    'overload': ('max_lag_frames', 'rss_growth_mb'),
    'swap': ('dropped_frames', 'max_pause_ms'),
    'cameras': ('cpu_ms_per_extra_camera_frame', 'rss_mb_per_extra_camera',
                'rss_mb_per_extra_camera_process'),
    'adaptation_interference': ('p99_ratio',),
    'model_zoo': ('models',),
    'adaptation': ('recovered_label_free', 'recovered_true_labels', 'gate_false_accepts',
                   'gate_false_rejects', 'round_seconds'),
    'adaptation_memory': ('rss_growth_ratio', 'growth_vs_old_design', 'bound_held'),
    'fleet': ('target_met', 'by_labels', 'poisoned'),
}
TIMEOUT_S = {'quick': 240, 'full': 1200}


def summarize(name: str, d: dict) -> str:
    if 'skipped' in d:
        return f'skipped: {d["skipped"]}'
    if name == 'model_zoo':
        return '; '.join(f'{m}: acc {v["accuracy"] if v["accuracy"] is None else round(v["accuracy"], 4)}, '
                         f'{v["latency_ms"]:.3g} ms' for m, v in d['models'].items())
    if name == 'fleet':  # mean accuracy over every robot's held-out domain: best local head -> fleet heads
        return '; '.join(f'{src}: local {max(r["mean_all_domains"] for r in b["local"]):.3f} -> offer '
                         f'{b["offer"]["fleet_head_mean"]:.3f} / federated '
                         f'{b["federated"]["fleet_head_mean"]:.3f}' for src, b in d['by_labels'].items())
    vals = {k: d.get(k) for k in REQUIRED[name]}
    return ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in vals.items())


def add_args(p) -> None:
    p.add_argument('--only', nargs='+', choices=BENCHMARKS, default=None)
    p.add_argument('--summary-only', action='store_true',
                   help='run nothing: rebuild summary.json and the table from the result files already there '
                   '(after running benchmarks one by one)')


def run_one(name: str, args, out_dir) -> dict:
    """``python -m bench.<name>`` in its own process; its summary row."""
    cmd = [sys.executable, '-m', f'bench.{name}', '--results-dir', str(out_dir)]
    cmd += ['--quick'] if args.quick else []
    cmd += ['--bundle', args.bundle] if args.bundle else []
    print(f'=== {name}: {" ".join(cmd[1:])}', flush=True)
    path = out_dir / f'{name}.json'
    before = path.stat().st_mtime if path.exists() else None
    t0 = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=str(common.REPO), env=common.ros_env(),
                            timeout=TIMEOUT_S['quick' if args.quick else 'full']).returncode
    except subprocess.TimeoutExpired:
        rc = 'timeout'
    dt = time.monotonic() - t0
    fresh = path.exists() and path.stat().st_mtime != before
    if rc == 0 and fresh:
        d = json.loads(path.read_text())
        return {'benchmark': name, 'status': 'skipped' if 'skipped' in d else 'ok', 'seconds': dt,
                'result': summarize(name, d)}
    return {'benchmark': name, 'status': 'FAILED', 'seconds': dt,
            'result': f'exit {rc}, fresh result: {fresh}'}


def main(argv=None) -> int:
    args = common.bench_parser(__doc__, add_args).parse_args(argv)
    out_dir = common.results_dir(args)
    names = [] if args.summary_only else args.only or list(BENCHMARKS)
    t_all = time.monotonic()
    rows = [run_one(name, args, out_dir) for name in names]
    failed = any(r['status'] == 'FAILED' for r in rows)
    for name in BENCHMARKS:  # --only: list the other benchmarks' existing results too
        path = out_dir / f'{name}.json'
        if name not in names and path.exists():
            d = json.loads(path.read_text())
            rows.append({'benchmark': name, 'status': f'earlier ({d.get("timestamp")})',
                         'seconds': d.get('duration_s'), 'result': summarize(name, d)})
    rows.sort(key=lambda r: BENCHMARKS.index(r['benchmark']))
    print()
    m = common.machine_info()
    common.print_table(rows, title=f'edge_tl_ros benchmarks ({"quick" if args.quick else "full"}; '
                       f'{m["cores"]} cores, {m["cpu_model"]}, python {m["python"]}, '
                       f'onnxruntime {m["onnxruntime"]}, load {m["load_avg_1m"]:.1f})')
    common.write_result('summary', {'benchmarks': rows, 'total_s': time.monotonic() - t_all}, args,
                        module='run_all')
    return 1 if failed else 0


if __name__ == '__main__':
    raise SystemExit(main())
