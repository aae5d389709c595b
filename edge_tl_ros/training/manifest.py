"""What the training commands write into a bundle's ``manifest.yaml`` besides what the export writes.

- :func:`creation_command`: the ``edge-tl`` command line that made a bundle.
- :func:`trained_manifest` / :func:`training_record`: the ``role``, ``flops``, ``params``,
  ``creation_command`` and ``training`` keys the teacher and student bundles share.
- :func:`split_metrics`: the ``metrics`` block (val / test / fixed test subset accuracy of the exported
  bundle, measured with ONNX Runtime).
- :func:`update_manifest`: merge new keys into an existing manifest (sha256 recomputed); :func:`plain`
  makes values ``yaml.safe_dump``-safe.

No torch.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import yaml

from ..bundle import write_manifest
from ..data import Split
from .evaluate import evaluate_bundle

# The fixed test subset the shipped-model test re-evaluates quickly: np.arange(start, n, step).
TEST_SUBSET = {'start': 0, 'step': 5}
MERGED_KEYS = ('metrics', 'training')


def creation_command(args=None) -> str:
    """The ``edge-tl`` command line that made a bundle.

    With the parsed ``args`` of an ``edge-tl`` subcommand (registered with ``_parser`` in its defaults),
    the command line is rebuilt from the parser: the subcommand, its positionals and every option whose
    value differs from its default, so it is exact however the command was invoked (console script,
    ``python -m``, or ``edge_tl_ros.cli.main([...])`` from Python). Without it, ``sys.argv`` is used.
    """
    parser = getattr(args, '_parser', None) if args is not None else None
    if parser is None:
        return 'edge-tl ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
    words = [parser.prog.split()[-1]]
    for act in parser._actions:
        if act.dest in ('help', '_parser', 'func') or act.default == argparse.SUPPRESS:
            continue
        val = getattr(args, act.dest, None)
        if not act.option_strings:
            if val is not None:
                words.append(str(val))
            continue
        if val == act.default:
            continue
        opt = act.option_strings[-1]
        if isinstance(act, argparse._StoreConstAction):
            words.append(opt)
        elif isinstance(act, argparse._AppendAction):
            for v in val or []:
                words += [opt, str(v)]
        else:
            words += [opt, str(val)]
    return 'edge-tl ' + ' '.join(shlex.quote(w) for w in words)


def trained_manifest(role: str, cost: dict, command: str | None, **sections) -> dict:
    """The manifest keys of a trained bundle (``export_bundle(manifest_extra=...)``), ``sections`` last."""
    return {'role': role, 'flops': cost, 'params': cost['params'],
            'creation_command': command or creation_command(), **sections}


def training_record(data, hist, num_threads: int, **config) -> dict:
    """The ``training`` key: the data, ``config`` (in order), time, threads and the final figures."""
    return {'data': data.desc, **config, 'seconds': round(hist.seconds, 1), 'threads': num_threads,
            'final': {'train_loss': hist.train_loss[-1], 'val_acc': hist.val_acc[-1]}}


def test_subset_indices(n: int) -> np.ndarray:
    return np.arange(TEST_SUBSET['start'], n, TEST_SUBSET['step'])


def split_metrics(bundle_dir, data, with_subset: bool, log=print, num_threads: int = 2) -> dict:
    """Accuracy of the exported bundle (ONNX Runtime engine) on val / test (/ the fixed test subset)."""
    data_desc = f'{data.desc["kind"]} {Path(data.desc["source"]).name}'
    m = {}
    if len(data.val):
        r = evaluate_bundle(bundle_dir, data.val, with_latency=False, num_threads=num_threads, log=log)
        m['val'] = {'accuracy': r['accuracy'], 'n': r['n'], 'data': f'{data_desc}: {data.desc["val"]["how"]}'}
    if data.test is not None and len(data.test):
        r = evaluate_bundle(bundle_dir, data.test, num_threads=num_threads, log=log)
        m['test'] = {
            'accuracy': r['accuracy'],
            'top5_accuracy': r['top5_accuracy'],
            'n': r['n'],
            'mode': r['mode'],
            'data': f'{data_desc}: official test split',
            'worst_classes': {k: r['per_class'][k]['accuracy'] for k in r['worst_classes']},
        }
        m['latency_batch1'] = r['latency_batch1']
        if with_subset:
            idx = test_subset_indices(len(data.test))
            subset = Split(data.test.images[idx], data.test.labels[idx], data.test.class_names)
            m['test_subset'] = {
                'accuracy': evaluate_bundle(bundle_dir, subset, with_latency=False, num_threads=num_threads,
                                            log=log)['accuracy'],
                'n': int(len(idx)),
                'indices': f'np.arange({TEST_SUBSET["start"]}, {len(data.test)}, '
                f'{TEST_SUBSET["step"]}) of the official test split',
                **TEST_SUBSET,
                'data': f'{data_desc}: official test split (subset)',
            }
    return m


def plain(obj):
    """Manifest-safe (yaml.safe_dump) copy: numpy scalars/arrays, tuples, paths -> plain Python."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def update_manifest(root: str | Path, **updates) -> Path:
    """Update an existing manifest (sha256 recomputed): ``metrics``/``training`` are merged key by key,
    every other key is replaced."""
    root = Path(root)
    manifest = yaml.safe_load((root / 'manifest.yaml').read_text())
    for k, v in updates.items():
        if k in MERGED_KEYS and isinstance(v, dict) and isinstance(manifest.get(k), dict):
            manifest[k] = {**manifest[k], **v}
        else:
            manifest[k] = v
    return write_manifest(root, plain(manifest))
