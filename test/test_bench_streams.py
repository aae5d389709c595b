"""bench.adaptation's stream contrasts: the correlated order, and a --streams-only --quick run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.adaptation import RUN_LENGTH, STREAM_COSINES, correlated_order

REPO = Path(__file__).resolve().parents[1]


def test_correlated_order_makes_runs_of_one_class():
    y = np.repeat(np.arange(10), 1000)[np.random.default_rng(0).permutation(10_000)]  # no class runs out
    ix = correlated_order(y, 500, seed=1)
    assert len(ix) == 500 and len(set(ix.tolist())) == 500  # distinct frames of the pool
    cls = y[ix]
    bounds = np.flatnonzero(np.diff(cls)) + 1
    runs = np.diff(np.concatenate([[0], bounds, [len(cls)]]))
    # runs of one class (two draws in a row may pick the same class: a run is at least the minimum)
    assert runs[:-1].min() >= RUN_LENGTH[0] and np.median(runs) <= 2 * RUN_LENGTH[1]
    iid = y[:500]
    assert (np.diff(iid) != 0).mean() > 0.8 and (np.diff(cls) != 0).mean() < 0.06


def test_streams_only_quick(tmp_path):
    from bench import common

    if not (common.RESULTS / 'adaptation.json').is_file():
        pytest.skip('no full bench.adaptation result to take the oracle from')
    try:
        from edge_tl_ros.data import load_gtsrb_npz

        load_gtsrb_npz(None)
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f'GTSRB data absent ({e})')
    out = tmp_path / 'res'
    proc = subprocess.run([sys.executable, '-m', 'bench.adaptation', '--streams-only', '--quick',
                           '--results-dir', str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    if 'skipped' in proc.stdout:
        pytest.skip(proc.stdout.strip()[-300:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / 'adaptation_streams.json').read_text())
    (entry,) = res['per_shift']
    iid, corr = entry['streams']['iid'], entry['streams']['correlated']
    assert corr['classes'] < iid['classes']  # runs of one class: fewer signs in the same number of frames
    assert set(iid['variants']) == {'off', *(f'{c:g}' for c in STREAM_COSINES)}
    off, strict = corr['variants']['off'], corr['variants'][f'{min(STREAM_COSINES):g}']
    assert strict['labelled'] < off['labelled'] <= corr['confident']  # the filter thins the runs
    for key in ('recovered_label_free_iid', 'recovered_label_free_correlated'):
        assert isinstance(res[key], float) and math.isfinite(res[key]), (key, res[key])
    assert res['best_on_val'] in iid['variants'] and res['shipped_filter'] == 'off'
