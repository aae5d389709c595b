"""Training loops (teacher fine-tuning and knowledge distillation) on in-memory uint8 image arrays.

- :func:`kd_loss`: ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``.
- :func:`fit`: one loop for both the teacher (``teacher_logits=None``) and the students; batches are
  augmented on the fly with cheap batched affine warps + photometric jitter, upsampled to the model
  input size, normalised with the model's mean/std, and trained with AdamW + one-cycle LR.
- :func:`teacher_logits_cached`: the teacher's logits over the (un-augmented) training images, computed
  ONCE with ONNX Runtime from the teacher bundle and cached to an ``.npz`` keyed by a fingerprint of the
  teacher files and the images, so neither later epochs nor later runs recompute them.

torch is imported at module import: import this module only inside command functions.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Split


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    T: float = 4.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton distillation loss, averaged over the batch.

    ``(1 - alpha) * CE(student_logits, labels) + alpha * T**2 * KL(p_t || p_s)`` with
    ``p_t = softmax(teacher_logits / T)``, ``p_s = softmax(student_logits / T)``. ``alpha = 0`` is plain
    cross-entropy (no teacher needed); ``alpha = 1`` is pure distillation.
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing) if alpha < 1 else None
    if alpha <= 0 or teacher_logits is None:
        if alpha > 0:
            raise ValueError('kd_loss: alpha > 0 needs teacher logits')
        return ce
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits.to(student_logits.dtype) / T, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    kd = kl * (T * T)
    return kd * alpha if ce is None else (1 - alpha) * ce + alpha * kd


# -- batches -----------------------------------------------------------------------------------------------
@dataclass
class Augment:
    rotate_deg: float = 10.0
    shift: float = 0.10  # fraction of the image side
    scale: float = 0.10  # +- relative zoom
    brightness: float = 0.30  # +- relative gain
    contrast: float = 0.30
    offset: float = 20.0  # +- pixel-value offset
    enabled: bool = True


def to_tensor_batch(
    images: np.ndarray,
    mean,
    std,
    input_size: int,
    augment: Augment | None = None,
    gen: torch.Generator | None = None,
    interp: str = 'bilinear',
) -> torch.Tensor:
    """uint8 [N,H,W,3] RGB -> (augmented) normalised float [N,3,S,S] in channels_last memory format."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    n = x.shape[0]
    if augment is not None and augment.enabled and n:

        def u(*shape):  # uniform in [-1, 1)
            return torch.rand(*shape, generator=gen) * 2 - 1

        ang = u(n) * math.radians(augment.rotate_deg)
        sc = 1 + u(n) * augment.scale
        tx, ty = u(n) * augment.shift, u(n) * augment.shift
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, [n, 3, input_size, input_size], align_corners=False)
        x = F.grid_sample(
            x,
            grid,
            mode='nearest' if interp == 'nearest' else 'bilinear',
            padding_mode='border',
            align_corners=False,
        )
        gain = 1 + u(n, 1, 1, 1) * augment.brightness
        con = 1 + u(n, 1, 1, 1) * augment.contrast
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * con + m * gain + u(n, 1, 1, 1) * augment.offset).clamp_(0, 255)
    elif x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(
            x,
            size=(input_size, input_size),
            mode=interp,
            **({'align_corners': False} if interp == 'bilinear' else {}),
        )
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_logits(
    model, images: np.ndarray, input_size: int, batch_size: int = 512, progress: bool = False
) -> np.ndarray:
    model.eval()
    mean, std = model.norm
    out = []
    rng = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc='predict', unit='batch', leave=False, mininterval=1.0)
    for i in rng:
        out.append(model(to_tensor_batch(images[i : i + batch_size], mean, std, input_size)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float('nan')


# -- training ----------------------------------------------------------------------------------------------
@dataclass
class FitConfig:
    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    warmup: float = 0.15  # fraction of steps
    seed: int = 0
    input_size: int = 32
    temperature: float = 4.0
    alpha: float = 0.0
    evals_per_epoch: int = 1
    augment: Augment = field(default_factory=Augment)
    random_upsample: bool = False  # mix bilinear/nearest when upsampling (robust to either resize)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class History:
    steps: list = field(default_factory=list)
    epoch: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def fit(
    model,
    train: Split,
    val: Split | None,
    cfg: FitConfig,
    teacher_logits: np.ndarray | None = None,
    log=print,
    progress: bool = True,
) -> History:
    """Train ``model`` in place; returns the loss/accuracy curves."""
    if cfg.alpha > 0 and teacher_logits is None:
        raise ValueError('alpha > 0 needs teacher logits')
    if teacher_logits is not None and len(teacher_logits) != len(train):
        raise ValueError(f'{len(teacher_logits)} teacher logits for {len(train)} training images')
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n = len(train)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    mean, std = model.norm
    model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': cfg.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
        lr=cfg.lr,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        total_steps=total,
        pct_start=cfg.warmup,
        anneal_strategy='cos',
        div_factor=20.0,
        final_div_factor=200.0,
    )
    tl = torch.from_numpy(teacher_logits.astype(np.float32)) if teacher_logits is not None else None
    labels_all = torch.from_numpy(train.labels.astype(np.int64))
    hist = History()
    order = np.empty(0, np.int64)
    run_loss, run_correct, run_n = 0.0, 0, 0
    t0 = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f'train {model.arch}', unit='step', mininterval=2.0, leave=False)
    model.train()
    for step in range(total):
        if len(order) < bs:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = np.sort(order[:bs]), order[bs:]
        interp = 'nearest' if cfg.random_upsample and rng.random() < 0.5 else 'bilinear'
        x = to_tensor_batch(train.images[idx], mean, std, cfg.input_size, cfg.augment, gen, interp)
        y = labels_all[idx]
        logits = model(x)
        loss = kd_loss(
            logits, tl[idx] if tl is not None else None, y, cfg.temperature, cfg.alpha, cfg.label_smoothing
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run_loss += float(loss.detach()) * len(idx)
        run_correct += int((logits.detach().argmax(1) == y).sum())
        run_n += len(idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{run_loss / run_n:.3f}', refresh=False)
        if ((step + 1) % eval_every == 0 and total - step - 1 >= eval_every // 2) or step + 1 == total:
            va = (
                accuracy(predict_logits(model, val.images, cfg.input_size), val.labels)
                if val is not None and len(val)
                else float('nan')
            )
            model.train()
            hist.steps.append(step + 1)
            hist.epoch.append(round((step + 1) / steps_per_epoch, 3))
            hist.train_loss.append(run_loss / max(1, run_n))
            hist.train_acc.append(run_correct / max(1, run_n))
            hist.val_acc.append(va)
            hist.lr.append(float(sched.get_last_lr()[0]))
            log(
                f'[{model.arch}] epoch {hist.epoch[-1]:.2f} step {step + 1}/{total} '
                f'loss {hist.train_loss[-1]:.4f} train_acc {hist.train_acc[-1]:.4f} val_acc {va:.4f} '
                f'({time.time() - t0:.0f}s)'
            )
            run_loss, run_correct, run_n = 0.0, 0, 0
    if bar is not None:
        bar.close()
    model.eval()
    hist.seconds = time.time() - t0
    return hist


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
    from ..atomic import atomic_write_bytes, npz_bytes
    from ..bundle import load_bundle
    from ..engine import Engine

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
    input_size: int = 32
    epochs: float = 20.0
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 5e-4
    temperature: float = 4.0
    alpha: float = 0.7
    seed: int = 0
    evals_per_epoch: int = 1
    augment: Augment = field(default_factory=lambda: Augment(rotate_deg=8, shift=0.08, scale=0.08))


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
) -> dict:
    """Distil ``teacher`` (a bundle; not needed with ``alpha == 0``) into a student, export, evaluate."""
    import json

    from ..bundle import load_bundle, sha256_file
    from .export import creation_command, export_bundle, update_manifest
    from .models import build_model, cost_summary
    from .plots import plot_curves
    from .teacher import split_metrics

    torch.set_num_threads(num_threads)
    out = Path(out)
    work = Path(work) if work else out.parent / '.cache' / f'{out.name}_work'
    work.mkdir(parents=True, exist_ok=True)
    classes = data.train.class_names
    tlogits, tinfo = None, None
    if cfg.alpha > 0:
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
    torch.manual_seed(cfg.seed)  # same initial weights for the KD student and its alpha=0 ablation
    model = build_model(cfg.arch, len(classes), cfg.input_size, pretrained=False)
    cost = cost_summary(model, cfg.input_size)
    log(
        f'student {cfg.arch} @ {cfg.input_size}px: {cost["macs"] / 1e6:.2f} MMACs, {cost["params"]} params, '
        f'alpha {cfg.alpha}, T {cfg.temperature}, {cfg.epochs} epochs'
    )
    fcfg = FitConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        input_size=cfg.input_size,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        evals_per_epoch=cfg.evals_per_epoch,
        augment=cfg.augment,
    )
    hist = fit(model, data.train, data.val, fcfg, teacher_logits=tlogits, log=log, progress=progress)
    tag = f'alpha{cfg.alpha:g}'
    torch.save(model.state_dict(), work / f'student_{tag}.pt')
    (work / f'student_{tag}_history.json').write_text(json.dumps(hist.as_dict(), indent=1))
    summary = {'history': hist.as_dict(), 'cost': cost, 'train_seconds': round(hist.seconds, 1)}
    if not export:
        return summary
    data_desc = f'{data.desc["kind"]} {Path(data.desc["source"]).name}'
    extra = {
        'role': 'student',
        'flops': cost,
        'params': cost['params'],
        'creation_command': command or creation_command(),
        'distillation': {
            'teacher': tinfo,
            'temperature': cfg.temperature,
            'alpha': cfg.alpha,
            'loss': '(1-alpha)*CE(labels) + alpha*T^2*KL(softmax(teacher/T) || softmax(student/T))',
        },
        'training': {
            'data': data.desc,
            'config': fcfg.as_dict(),
            'seconds': round(hist.seconds, 1),
            'threads': num_threads,
            'final': {'train_loss': hist.train_loss[-1], 'val_acc': hist.val_acc[-1]},
        },
        'deployment': {'modes': ['full', 'feature_extractor', 'incremental']},
    }
    if tinfo and tinfo.get('teacher_macs'):
        extra['flops']['teacher_macs'] = tinfo['teacher_macs']
        extra['flops']['fraction_of_teacher'] = round(cost['macs'] / tinfo['teacher_macs'], 5)
    export_bundle(
        model,
        out,
        classes,
        cfg.input_size,
        name,
        with_full=True,
        anchor_split=data.full_train,
        anchor_per_class=anchor_per_class,
        parity_images=data.val.images[:16],
        manifest_extra=extra,
        log=log,
    )
    metrics = split_metrics(out, data, data_desc, with_subset=False, log=log, num_threads=num_threads)
    update_manifest(out, metrics=metrics)
    summary.update(bundle=str(out), metrics=metrics)
    if int8 and len(data.val):
        from .quantize import quantize_backbone

        rng = np.random.default_rng(cfg.seed)
        calib = data.train.images[
            np.sort(rng.choice(len(data.train), min(512, len(data.train)), replace=False))
        ]
        q = quantize_backbone(out, calib, data.val, data.test, log=log)
        update_manifest(out, metrics={'int8': q})
        summary['int8'] = q
    summary['curves_png'] = str(
        plot_curves({f'{cfg.arch} {tag}': hist.as_dict()}, work / f'student_{tag}.png')
    )
    return summary
