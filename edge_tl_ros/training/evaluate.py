"""Evaluate a model bundle with ONNX Runtime (the robot's engine): accuracy, per-class accuracy,
confusion matrix, calibration error (ECE), accuracy under the synthetic shifts of
:mod:`edge_tl_ros.shifts`, batch-1 latency. No torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..bundle import ModelBundle, load_bundle
from ..calibration import ece
from ..data import Split
from ..engine import Engine


def default_mode(bundle: ModelBundle) -> str:
    return 'full' if bundle.path('full') is not None else 'feature_extractor'


def predict(
    bundle: ModelBundle,
    images: np.ndarray,
    mode: str | None = None,
    use_int8: bool = False,
    num_threads: int = 2,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Class probabilities [N,C] from the bundle's engine (``Engine.predict_batch``)."""
    eng = Engine(bundle, mode or default_mode(bundle), num_threads=num_threads, use_int8=use_int8)
    rng = range(0, len(images), batch_size * 8)
    if progress and len(images) > batch_size * 8:
        from tqdm import tqdm

        rng = tqdm(rng, desc=f'evaluate {bundle.name}', unit='chunk', leave=False, mininterval=1.0)
    out = [eng.predict_batch(images[i : i + batch_size * 8], 'rgb', batch_size) for i in rng]
    return np.concatenate(out) if out else np.zeros((0, len(bundle.class_names)), np.float32)


def confusion(labels: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def accuracy_report(labels: np.ndarray, probs: np.ndarray, class_names) -> dict:
    pred = probs.argmax(1)
    n = len(class_names)
    cm = confusion(labels, pred, n)
    per_class = {}
    for c in range(n):
        m = labels == c
        if m.any():
            per_class[str(class_names[c])] = {
                'accuracy': round(float((pred[m] == c).mean()), 5),
                'n': int(m.sum()),
            }
    top5 = np.argsort(-probs, axis=1)[:, :5]
    return {
        'accuracy': round(float((pred == labels).mean()), 5) if len(labels) else None,
        'top5_accuracy': round(float((top5 == labels[:, None]).any(1).mean()), 5) if len(labels) else None,
        'n': int(len(labels)),
        'ece': round(ece(probs, labels), 5) if len(labels) else None,
        'per_class': per_class,
        'worst_classes': sorted(per_class, key=lambda k: per_class[k]['accuracy'])[:5],
        'confusion_matrix': cm,
    }


def shift_report(
    bundle: ModelBundle | str | Path,
    split: Split,
    shifts=None,
    severities=(3, 5),
    mode: str | None = None,
    num_threads: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Top-1 accuracy of ``bundle`` on ``split`` under each shift of ``edge_tl_ros.shifts`` (default: all)
    at each severity: ``{'accuracy': {shift: {str(severity): acc}}, 'mean': mean over all cells, ...}``.
    The shifted images are the same for every bundle (one ``seed`` per shift)."""
    from ..shifts import SHIFTS, apply_shift, check_shift

    if not isinstance(bundle, ModelBundle):
        bundle = load_bundle(bundle)
    names = [check_shift(s, severities[0]) for s in (shifts or list(SHIFTS))]
    for sev in severities:
        check_shift(names[0], sev)
    acc = {}
    cells = [(n, s) for n in names for s in severities]
    if progress:
        from tqdm import tqdm

        cells = tqdm(cells, desc=f'shifts {bundle.name}', unit='shift', leave=False)
    for name, sev in cells:
        shifted = apply_shift(split.images, name, int(sev), seed=seed)
        probs = predict(bundle, shifted, mode, num_threads=num_threads)
        acc.setdefault(name, {})[str(sev)] = round(float((probs.argmax(1) == split.labels).mean()), 5)
    flat = [a for per in acc.values() for a in per.values()]
    return {
        'accuracy': acc,
        'mean': round(float(np.mean(flat)), 5),
        'worst': list(min(((n, s) for n in acc for s in acc[n]), key=lambda k: acc[k[0]][k[1]])),
        'severities': [int(s) for s in severities],
        'n': int(len(split)),
        'seed': int(seed),
    }


def latency(
    bundle: ModelBundle,
    num_threads: int = 1,
    mode: str | None = None,
    use_int8: bool = False,
    runs: int = 200,
    warmup: int = 20,
) -> dict:
    """Batch-1 latency in ms (median, p90): the ONNX session alone and ``Engine.infer`` end to end
    (resize + normalise + session + numpy head + softmax) on a 32x32 RGB frame."""
    eng = Engine(bundle, mode or default_mode(bundle), num_threads=num_threads, use_int8=use_int8)
    h, w = bundle.input_size
    x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
    frame = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    name_in, name_out = eng.session.get_inputs()[0].name, eng.session.get_outputs()[0].name
    for _ in range(warmup):
        eng.session.run([name_out], {name_in: x})
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        eng.session.run([name_out], {name_in: x})
        ts.append(time.perf_counter() - t)
    ti = []
    for _ in range(max(20, runs // 2)):
        t = time.perf_counter()
        eng.infer(frame, 'rgb')
        ti.append(time.perf_counter() - t)
    ts, ti = np.asarray(ts) * 1e3, np.asarray(ti) * 1e3
    return {
        'threads': int(num_threads),
        'mode': eng.mode,
        'int8': bool(use_int8),
        'onnx_ms_median': round(float(np.median(ts)), 4),
        'onnx_ms_p90': round(float(np.percentile(ts, 90)), 4),
        'infer_ms_median': round(float(np.median(ti)), 4),
        'runs': int(runs),
    }


def evaluate_bundle(
    bundle: ModelBundle | str | Path,
    split: Split,
    data_desc: str = '',
    mode: str | None = None,
    use_int8: bool = False,
    num_threads: int = 2,
    with_latency: bool = True,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Accuracy/per-class/confusion (+ latency at batch 1 with 1 and 2 threads); writes
    ``evaluation.json`` and ``confusion.png`` into ``out_dir`` when given."""
    if not isinstance(bundle, ModelBundle):
        bundle = load_bundle(bundle)
    mode = mode or default_mode(bundle)
    if tuple(split.class_names) != tuple(bundle.class_names):
        if len(split.class_names) != len(bundle.class_names):
            raise ValueError(
                f'data has {len(split.class_names)} classes, bundle {bundle.name} has '
                f'{len(bundle.class_names)}'
            )
        log('warning: class names of data and bundle differ; comparing by class index')
    t0 = time.time()
    probs = predict(bundle, split.images, mode, use_int8, num_threads, progress=progress)
    rep = accuracy_report(split.labels, probs, bundle.class_names)
    rep.update(
        {
            'bundle': str(bundle.root),
            'bundle_name': bundle.name,
            'mode': mode,
            'int8': bool(use_int8),
            'data': data_desc,
            'seconds': round(time.time() - t0, 2),
        }
    )
    if with_latency:
        rep['latency_batch1'] = [latency(bundle, t, mode, use_int8) for t in (1, 2)]
    cm = rep.pop('confusion_matrix')
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from .plots import plot_confusion

        png = plot_confusion(
            cm,
            bundle.class_names,
            out_dir / 'confusion.png',
            f'{bundle.name} ({mode}{", int8" if use_int8 else ""}): '
            f'accuracy {rep["accuracy"]:.4f} on {data_desc or "data"}',
        )
        rep['confusion_png'] = str(png)
        rep['confusion_matrix'] = cm.tolist()
        (out_dir / 'evaluation.json').write_text(json.dumps(rep, indent=2) + '\n')
        rep['json'] = str(out_dir / 'evaluation.json')
    else:
        rep['confusion_matrix'] = cm.tolist()
    return rep
