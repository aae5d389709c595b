"""Knowledge distillation of a teacher bundle into a small student, exported as a complete bundle.

- :func:`teacher_logits_cached`: the teacher's logits over the (un-augmented) training images, computed
  ONCE with ONNX Runtime from the teacher bundle and cached to an ``.npz`` keyed by a fingerprint of the
  teacher files and the images, so neither later epochs nor later runs recompute them.
- :func:`train_student`: :func:`edge_tl_ros.training.loop.fit` with the KD loss
  (:func:`~edge_tl_ros.training.loop.kd_loss`; ``alpha = 0`` trains without a teacher), then export,
  evaluation and (optionally) int8 quantisation of the backbone.

torch is imported at module import: import this module only inside command functions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_bytes, npz_bytes
from ..bundle import load_bundle, sha256_file
from ..engine import Engine
from .export import export_bundle
from .loop import Augment, FitConfig, accuracy, fit
from .manifest import split_metrics, trained_manifest, training_record, update_manifest
from .models import build_model, cost_summary
from .plots import plot_curves
from .quantize import calibration_frames, quantize_backbone


# -- teacher logits cache ----------------------------------------------------------------------------------
def fingerprint(images: np.ndarray, files: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images[:: max(1, len(images) // 512)]).tobytes())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def teacher_logits_cached(
    teacher_bundle,
    images: np.ndarray,
    cache: Path | None,
    num_threads: int = 2,
    log=print,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Teacher logits over ``images`` (un-augmented), via ONNX Runtime; cached in ``cache`` (.npz)."""
    bundle = load_bundle(teacher_bundle)
    fp = fingerprint(images, [bundle.files['backbone'], bundle.files['head']])
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z['fingerprint']) == fp and z['logits'].shape[0] == len(images):
                log(f'teacher logits: reusing cache {cache}')
                return z['logits'].astype(np.float32)
        log(f'teacher logits: cache {cache} is stale (other teacher or data); recomputing')
    eng = Engine(bundle, 'feature_extractor', num_threads=num_threads)
    t0 = time.time()
    rng = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc='teacher logits', unit='batch', leave=False, mininterval=1.0)
    feats = [eng.features_batch(images[i : i + batch_size], 'rgb', batch_size) for i in rng]
    logits = eng.head.logits(np.concatenate(feats)).astype(np.float32)
    log(f'teacher logits: {len(images)} images in {time.time() - t0:.0f}s')
    if cache is not None:
        atomic_write_bytes(cache, npz_bytes(logits=logits, fingerprint=np.str_(fp)))
    return logits


# -- student -----------------------------------------------------------------------------------------------
@dataclass
class StudentConfig:
    arch: str = 'seed_cnn'
    fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=20.0, batch_size=128, lr=4e-3, weight_decay=5e-4, temperature=4.0, alpha=0.7,
        augment=Augment(rotate_deg=8, shift=0.08, scale=0.08)))


def train_student(
    data,
    teacher: str | Path | None,
    out: str | Path,
    cfg: StudentConfig,
    name: str = 'gtsrb_student',
    work: str | Path | None = None,
    logits_cache: str | Path | None = None,
    command: str | None = None,
    int8: bool = True,
    anchor_per_class: int = 16,
    num_threads: int = 2,
    export: bool = True,
    log=print,
    progress: bool = True,
    background: np.ndarray | None = None,
) -> dict:
    """Distil ``teacher`` (a bundle; not needed with ``alpha == 0``) into a student, export, evaluate.
    ``background``: no-sign images for outlier exposure (``cfg.fit.outlier_weight > 0``)."""
    f = cfg.fit
    torch.set_num_threads(num_threads)
    out = Path(out)
    work = Path(work) if work else out.parent / '.cache' / f'{out.name}_work'
    work.mkdir(parents=True, exist_ok=True)
    classes = data.train.class_names
    tlogits, tinfo = None, None
    if f.alpha > 0:
        if teacher is None:
            raise ValueError('distillation with alpha > 0 needs --teacher BUNDLE')
        tb = load_bundle(teacher)
        if tuple(tb.class_names) != tuple(classes):
            raise ValueError(
                f'teacher {tb.name} has {len(tb.class_names)} classes, the data has {len(classes)}'
            )
        cache = Path(logits_cache) if logits_cache else work / 'teacher_logits.npz'
        tlogits = teacher_logits_cached(
            teacher, data.train.images, cache, num_threads, log, progress=progress
        )
        tinfo = {
            'bundle': tb.name,
            'architecture': tb.manifest.get('architecture'),
            'backbone_sha256': sha256_file(tb.files['backbone']),
            'head_sha256': sha256_file(tb.files['head']),
            'teacher_train_accuracy_on_fit_split': round(accuracy(tlogits, data.train.labels), 5),
            'logits': 'computed once over the un-augmented fit images with ONNX Runtime, cached in '
            f'{cache.name}',
        }
        if 'metrics' in tb.manifest and 'test' in tb.manifest['metrics']:
            tinfo['teacher_test_accuracy'] = tb.manifest['metrics']['test']['accuracy']
        if tb.manifest.get('flops'):
            tinfo['teacher_macs'] = tb.manifest['flops'].get('macs')
    torch.manual_seed(f.seed)  # same initial weights for the KD student and its alpha=0 ablation
    model = build_model(cfg.arch, len(classes), f.input_size, pretrained=False)
    cost = cost_summary(model, f.input_size)
    log(
        f'student {cfg.arch} @ {f.input_size}px: {cost["macs"] / 1e6:.2f} MMACs, {cost["params"]} params, '
        f'alpha {f.alpha}, T {f.temperature}, {f.epochs} epochs'
    )
    hist = fit(model, data.train, data.val, f, teacher_logits=tlogits, log=log, progress=progress,
               background=background)
    tag = f'alpha{f.alpha:g}'
    torch.save(model.state_dict(), work / f'student_{tag}.pt')
    (work / f'student_{tag}_history.json').write_text(json.dumps(hist.as_dict(), indent=1))
    summary = {'history': hist.as_dict(), 'cost': cost, 'train_seconds': round(hist.seconds, 1)}
    if not export:
        return summary
    extra = trained_manifest(
        'student', cost, command,
        distillation={
            'teacher': tinfo,
            'temperature': f.temperature,
            'alpha': f.alpha,
            'loss': '(1-alpha)*CE(labels) + alpha*T^2*KL(softmax(teacher/T) || softmax(student/T))',
        },
        training=training_record(data, hist, num_threads, config=f.as_dict(),
                                 **({'outlier_exposure': {'background_images': int(len(background)),
                                                          'weight': f.outlier_weight}}
                                    if f.outlier_weight > 0 and background is not None else {})),
        deployment={'modes': ['full', 'feature_extractor', 'incremental']},
    )
    if tinfo and tinfo.get('teacher_macs'):
        extra['flops']['teacher_macs'] = tinfo['teacher_macs']
        extra['flops']['fraction_of_teacher'] = round(cost['macs'] / tinfo['teacher_macs'], 5)
    export_bundle(model, out, classes, f.input_size, name, with_full=True, anchor_split=data.full_train,
                  anchor_per_class=anchor_per_class, parity_images=data.val.images[:16], manifest_extra=extra,
                  log=log)
    metrics = split_metrics(out, data, with_subset=False, log=log, num_threads=num_threads)
    update_manifest(out, metrics=metrics)
    summary.update(bundle=str(out), metrics=metrics)
    if int8 and len(data.val):
        summary['int8'] = quantize_backbone(out, calibration_frames(data.train.images, 512, f.seed), data.val,
                                            data.test, log=log)
    summary['curves_png'] = str(
        plot_curves({f'{cfg.arch} {tag}': hist.as_dict()}, work / f'student_{tag}.png')
    )
    return summary
