"""Calibrate an exported bundle and set its reject threshold (ONNX Runtime + numpy; no torch).

:func:`calibrate_bundle`:

1. logits of the bundle on the validation tracks (never the test split) -> temperature ``T``
   (:func:`edge_tl_ros.calibration.fit_temperature`);
2. ``1/T`` is folded into ``head.npz`` (weight and bias) and into ``full.onnx`` (one ``Mul`` after the
   logits), so every consumer reads calibrated probabilities; calibrating again composes the factors;
3. ``min_score`` = the calibrated score that keeps ``keep`` of the validation signs
   (:func:`~edge_tl_ros.calibration.reject_threshold`); the perception node publishes no class below it;
4. measured and written to the manifest (``calibration``, ``reject``): ECE before/after on validation
   and test, and at ``min_score`` the false-accept rate of background crops from GTSDB *test* scenes
   (windows touching no annotated sign), the test signs accepted and their accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Head, load_bundle
from ..calibration import ece, fit_temperature, reject_report, reject_threshold, softmax
from ..engine import Engine


def bundle_logits(bundle_dir, images: np.ndarray, num_threads: int = 2, batch_size: int = 256) -> np.ndarray:
    eng = Engine(load_bundle(bundle_dir), 'feature_extractor', num_threads=num_threads)
    if not len(images):
        return np.zeros((0, len(eng.head.class_names)), np.float32)
    feats = np.concatenate([eng.features_batch(images[i:i + batch_size], 'rgb', batch_size)
                            for i in range(0, len(images), batch_size)])
    return eng.head.logits(feats).astype(np.float32)


def _scale_full_onnx(path: Path, factor: float) -> None:
    """Multiply the ``logits`` output of ``full.onnx`` by ``factor`` (a Mul node; atomic rewrite)."""
    import onnx
    from onnx import helper, numpy_helper

    from ..atomic import atomic_write_bytes

    model = onnx.load(str(path))
    g = model.graph
    out = next(o for o in g.output if o.name == 'logits')
    raw = f'logits_before_scale_{len(g.node)}'
    for node in g.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    name = f'logit_scale_{len(g.node)}'
    g.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), name))
    g.node.append(helper.make_node('Mul', [raw, name], [out.name], name=f'calibration_{len(g.node)}'))
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())


def calibrate_bundle(bundle_dir, val, test=None, background: np.ndarray | None = None, keep: float = 0.99,
                     background_desc: str = '', num_threads: int = 2, log=print) -> dict:
    """Temperature-scale ``bundle_dir`` in place on ``val`` (a Split), set ``min_score``; returns the
    ``calibration`` and ``reject`` manifest blocks (also written to the manifest)."""
    from .manifest import update_manifest

    root = Path(bundle_dir)
    b = load_bundle(root)
    lv = bundle_logits(root, val.images, num_threads)
    t = fit_temperature(lv, val.labels)
    prior = float((b.manifest.get('calibration') or {}).get('temperature', 1.0))
    lt = bundle_logits(root, test.images, num_threads) if test is not None and len(test) else None
    lb = bundle_logits(root, background, num_threads) if background is not None else None
    cal = {
        'method': 'temperature scaling (NLL on the validation tracks), folded into head.npz'
                  + (' and full.onnx' if 'full' in b.files else ''),
        'temperature': round(prior * t, 5),
        'ece_val_before': round(ece(softmax(lv), val.labels), 5),
        'ece_val_after': round(ece(softmax(lv, t), val.labels), 5),
        'val_n': int(len(val)),
    }
    if lt is not None:
        cal['ece_test_before'] = round(ece(softmax(lt), test.labels), 5)
        cal['ece_test_after'] = round(ece(softmax(lt, t), test.labels), 5)
    h = b.head
    Head(h.weight / t, h.bias / t, h.class_names).save(b.files['head'])
    if 'full' in b.files:
        _scale_full_onnx(Path(b.files['full']), 1.0 / t)
    min_score = reject_threshold(softmax(lv, t), keep)
    rej = {'min_score': round(min_score, 5), 'chosen': f'keeps {keep:g} of the validation signs',
           'keep': keep}
    if lt is not None:
        pb = softmax(lb, t) if lb is not None and len(lb) else np.zeros((0, lt.shape[1]))
        rep = reject_report(softmax(lt, t), test.labels, pb, min_score)
        rep.pop('min_score')
        rej.update(test=rep, background=background_desc)
    update_manifest(root, calibration=cal, reject=rej)
    load_bundle(root)  # hashes and shapes still valid
    log(f'calibrated {root}: T={t:.3f} (x{prior:g} before), ECE val {cal["ece_val_before"]:.4f} -> '
        f'{cal["ece_val_after"]:.4f}; min_score {min_score:.3f}: {rej.get("test")}')
    return {'calibration': cal, 'reject': rej}
