"""The benchmark suite runs end to end (``python -m bench.run_all --quick``) and writes valid results.

Checks that the code works and the JSON files are complete and well-formed; it never asserts speed
(CI machines are shared and slow). Benchmarks that need trained models or data absent here must write
``{"skipped": reason}``, so this keeps passing without them.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('rclpy')
pytest.importorskip('psutil')
pytest.importorskip('matplotlib')

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run_all import BENCHMARKS, REQUIRED  # noqa: E402

COMMON_KEYS = ('name', 'quick', 'timestamp', 'command', 'machine')
MACHINE_KEYS = ('cores', 'cpu_model', 'python', 'onnxruntime')


def _no_nan(c):
    raise ValueError(f'non-finite number {c} in a result file')


def _numbers(x, path=''):
    """Every number inside ``x`` with its path."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f'{path}.{k}')
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f'{path}[{i}]')


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.slow
def test_run_all_quick_writes_valid_results(tmp_path):
    out = tmp_path / 'results'
    proc = subprocess.run([sys.executable, '-m', 'bench.run_all', '--quick', '--results-dir', str(out)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=1200)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    for name in BENCHMARKS:
        path = out / f'{name}.json'
        assert path.is_file(), f'{name}: no result file\n{log}'
        d = json.loads(path.read_text(), parse_constant=_no_nan)
        for k in COMMON_KEYS:
            assert k in d, f'{name}: missing {k}'
        assert d['name'] == name and d['quick'] is True
        for k in MACHINE_KEYS:
            assert k in d['machine'], f'{name}: machine lacks {k}'
        assert isinstance(d['machine']['cores'], int) and d['machine']['cores'] >= 1
        for p, v in _numbers(d):
            assert math.isfinite(v), f'{name}{p} = {v}'
        if 'skipped' in d:
            assert isinstance(d['skipped'], str) and d['skipped'], name
            continue
        for k in REQUIRED[name]:
            assert k in d, f'{name}: missing required key {k}'
        if name == 'model_zoo':
            assert d['models'], 'model_zoo lists no models'
            for model, m in d['models'].items():
                assert set(m) >= {'accuracy', 'gflops', 'latency_ms'}, model
                assert _is_number(m['latency_ms']) and _is_number(m['gflops']), model
                assert m['accuracy'] is None or 0.0 <= m['accuracy'] <= 1.0, model
        elif name == 'fleet':  # per label source: the local heads and the fleet heads on every domain
            for src, b in d['by_labels'].items():
                assert set(d['target_met'][src]) == {'offer', 'federated'}, d['target_met']
                assert all(isinstance(v, bool) for v in d['target_met'][src].values())
                for mode in ('offer', 'federated'):
                    assert 0.0 <= b[mode]['fleet_head_mean'] <= 1.0, (src, mode)
                assert all(0.0 <= r['mean_all_domains'] <= 1.0 for r in b['local']), src
            assert _is_number(d['poisoned']['fedavg_no_clip']['fleet_head_mean'])
        elif name == 'adaptation_memory':  # the bound is a yes/no, the rest are figures
            assert d['bound_held'] is True, d.get('cases')
            assert _is_number(d['rss_growth_ratio']) and _is_number(d['growth_vs_old_design']), d
        else:
            for k in REQUIRED[name]:
                assert _is_number(d[k]), f'{name}.{k} = {d[k]!r} is not a finite number'
    summary = json.loads((out / 'summary.json').read_text(), parse_constant=_no_nan)
    assert [r['benchmark'] for r in summary['benchmarks']] == list(BENCHMARKS)
    assert all(r['status'] in ('ok', 'skipped') for r in summary['benchmarks'])
    # the node benchmarks need no trained model (they fall back to a toy bundle): they must really run
    for name in ('node_latency', 'overload', 'swap'):
        d = json.loads((out / f'{name}.json').read_text())
        assert 'skipped' not in d, name
        assert (out / f'{name}.png').is_file(), name
    nl = json.loads((out / 'node_latency.json').read_text())
    assert nl['runs'][0]['classified'] > 0
    ov = json.loads((out / 'overload.json').read_text())
    assert all(r['node_processed'] > 0 for r in ov['runs'])
    sw = json.loads((out / 'swap.json').read_text())
    assert sw['swaps_ok'] == sw['swaps_requested'] > 0
    ad = json.loads((out / 'adaptation.json').read_text())
    if 'skipped' not in ad:  # the same-run ceilings of the local frames are there for every shift
        for e in ad['shifts']:
            c = e['ceiling']
            assert c['frames'] == ad['gap_recovered_frames'] and 0.0 <= c['head_true'] <= 1.0, c
            assert c.get('full_true') is None or 0.0 <= c['full_true'] <= 1.0, c


def test_adaptation_bench_on_a_users_target(tmp_path):
    """`python -m bench.adaptation --target NPZ`: the user's own local stream / held-out frames become one
    more domain with the same figures; a file of the wrong layout is one clear line, not a traceback."""
    from edge_tl_ros import data as DD
    from edge_tl_ros.shifts import apply_shift
    from edge_tl_ros.training import datasets as D

    try:
        tr, _ = DD.load_gtsrb_npz(None)
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f'GTSRB data absent ({e}); the benchmark needs the source test set')
    i = np.random.default_rng(5).permutation(len(tr))[:260]
    X = apply_shift(tr.images[i], 'rain', 4, seed=3)
    target = tmp_path / 'my_rain.npz'
    D.save_npz(D.Dataset(DD.Split(X[:160], tr.labels[i[:160]], tr.class_names),
                         DD.Split(X[160:], tr.labels[i[160:]], tr.class_names), 'gtsrb-npz', 'rain'), target)
    out = tmp_path / 'res'
    proc = subprocess.run([sys.executable, '-m', 'bench.adaptation', '--quick', '--target', str(target),
                           '--results-dir', str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / 'adaptation.json').read_text(), parse_constant=_no_nan)
    mine = [d for d in res['per_domain'] if d['target']]
    assert [d['domain'] for d in mine] == ['my_rain'] and res['targets'] == [str(target)]
    for key in ('source_only', 'oracle', 'recovered_label_free', 'recovered_true_labels'):
        assert isinstance(mine[0][key], float) and math.isfinite(mine[0][key]), (key, mine[0])
    entry = next(e for e in res['shifts'] if e['target'])
    assert {r['label_source'] for r in entry['runs']} >= {'topic', 'teacher'}
    assert all(r['shipped'] is not None for r in entry['runs'] if r['label_source'] != 'self')
    bad = tmp_path / 'bad.npz'
    np.savez(bad, images=np.zeros((3, 32, 32, 3), np.uint8))
    proc = subprocess.run([sys.executable, '-m', 'bench.adaptation', '--quick', '--target', str(bad),
                           '--results-dir', str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert '--target' in proc.stderr + proc.stdout and 'bad.npz' in proc.stderr + proc.stdout
