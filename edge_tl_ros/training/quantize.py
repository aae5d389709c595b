"""Static int8 quantisation of a bundle's backbone (ONNX Runtime, QDQ format).

Calibrated on real training frames (:func:`calibration_frames`). The int8 backbone stays in the bundle
(``files.backbone_int8``) only if it is faster at batch 1 AND loses at most ``max_drop`` accuracy points
on held-out data; both the fp32 and the int8 figures are recorded in the manifest (``metrics.int8``)
either way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..bundle import load_bundle
from ..data import Split
from ..engine import Engine
from .evaluate import latency, predict
from .manifest import update_manifest


def calibration_frames(images: np.ndarray, n: int = 512, seed: int = 0) -> np.ndarray:
    """``n`` random frames of ``images`` (in their order), the calibration set."""
    rng = np.random.default_rng(seed)
    return images[np.sort(rng.choice(len(images), min(n, len(images)), replace=False))]


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over normalised real frames."""

    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not needed by MinMax; present for API completeness
        pass


def quantize_backbone(
    bundle_dir: str | Path,
    calib_images: np.ndarray,
    heldout: Split,
    test: Split | None = None,
    max_drop: float = 0.5,
    calib_batch: int = 32,
    per_channel: bool = True,
    log=print,
) -> dict:
    """Write ``backbone.int8.onnx``, measure it against fp32, keep or delete it, record the figures in the
    manifest (``metrics.int8``) and return them."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    fp32_path = bundle.files['backbone']
    int8_path = bundle_dir / 'backbone.int8.onnx'
    eng = Engine(bundle, 'feature_extractor', num_threads=1)
    batches = [
        {'image': eng.prepare_batch(calib_images[i : i + calib_batch])}
        for i in range(0, len(calib_images), calib_batch)
    ]
    src = fp32_path
    with tempfile.TemporaryDirectory() as td:
        try:  # shape inference + graph optimisation before quantising (recommended by ORT)
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(td) / 'pre.onnx'
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception as e:  # optional step; quantise the raw graph if it fails
            log(f'quantize: pre-processing skipped ({e.__class__.__name__}: {e})')
        quantize_static(
            str(src),
            str(int8_path),
            _Reader(batches),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
        )
    # evaluate both on held-out data (decision) and on the test split (report)
    files = dict(bundle.manifest['files'])
    files['backbone_int8'] = int8_path.name
    update_manifest(bundle_dir, files=files)
    bundle = load_bundle(bundle_dir)
    res = {
        'calibration': {
            'frames': int(len(calib_images)),
            'source': 'training split',
            'method': 'MinMax',
            'format': 'QDQ',
            'per_channel': bool(per_channel),
        }
    }

    def acc(split, use_int8):
        return round(float((predict(bundle, split.images, 'feature_extractor', use_int8).argmax(1)
                            == split.labels).mean()), 5)

    for tag, use_int8 in (('fp32', False), ('int8', True)):
        r = {'heldout_accuracy': acc(heldout, use_int8), 'heldout_n': int(len(heldout))}
        if test is not None:
            r['test_accuracy'] = acc(test, use_int8)
            r['test_n'] = int(len(test))
        r['latency_ms_batch1_1thread'] = latency(bundle, 1, 'feature_extractor', use_int8, runs=300)[
            'onnx_ms_median'
        ]
        res[tag] = r
    drop = 100 * (res['fp32']['heldout_accuracy'] - res['int8']['heldout_accuracy'])
    faster = res['int8']['latency_ms_batch1_1thread'] < res['fp32']['latency_ms_batch1_1thread']
    keep = bool(faster and drop <= max_drop)
    res['accuracy_drop_points'] = round(drop, 3)
    res['faster'] = bool(faster)
    res['kept'] = keep
    res['rule'] = f'keep only if faster at batch 1 and heldout accuracy drop <= {max_drop} points'
    if not keep:
        files.pop('backbone_int8')
        int8_path.unlink(missing_ok=True)
    update_manifest(bundle_dir, files=files, metrics={'int8': res})
    log(f'quantize: fp32 {res["fp32"]} int8 {res["int8"]} -> {"kept" if keep else "dropped"}')
    return res
