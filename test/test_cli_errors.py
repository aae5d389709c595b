"""User errors of the ``edge-tl`` data commands are one clear line on stderr (exit 2), never a traceback."""

import subprocess
import sys

import numpy as np
import pytest

from edge_tl_ros.bundle import default_model_path


def _run(*args):
    return subprocess.run([sys.executable, '-m', 'edge_tl_ros.cli', *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def wrong_layout(tmp_path):
    path = tmp_path / 'wrong.npz'
    np.savez(path, images=np.zeros((4, 8, 8, 3), np.uint8), targets=np.zeros(4, np.int64))
    return path


def _one_line(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert 'Traceback' not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
    for n in needles:
        assert n in err, err


def test_data_info_wrong_layout_is_one_line(wrong_layout):
    _one_line(_run('data-info', str(wrong_layout)), 'wrong.npz', 'lacks', 'X_train')


@pytest.mark.skipif(not (default_model_path() / 'manifest.yaml').is_file(), reason='no shipped student')
def test_evaluate_by_shipped_name_and_wrong_layout_is_one_line(wrong_layout):
    # the bundle is named as shipped (not a path); the npz of the wrong layout is the one error
    _one_line(_run('evaluate', 'gtsrb_student', '--data', str(wrong_layout)), 'wrong.npz', 'lacks')


def test_evaluate_unknown_bundle_is_one_line(tmp_path, wrong_layout):
    _one_line(_run('evaluate', str(tmp_path / 'nope'), '--data', str(wrong_layout)), 'nope')
