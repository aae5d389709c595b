"""The training loop shared by the teacher and the students, on in-memory uint8 image arrays.

- :func:`kd_loss`: ``(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``
  (plain cross-entropy with ``alpha = 0``, the teacher's case).
- :class:`FitConfig`: epochs, batch size, optimiser, schedule, augmentation, input size, KD weights; the
  teacher and student configs embed one.
- :func:`fit`: batches are augmented on the fly with cheap batched affine warps + photometric jitter,
  upsampled to the model input size, normalised with the model's mean/std, and trained with AdamW +
  one-cycle LR; returns the loss/accuracy curves (:class:`History`).

torch is imported at module import: import this module only inside command functions.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Split
from .augment import RobustAugment


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
    # generic robustness augmentation at the stored resolution, before the warp above (None = off)
    robust: RobustAugment | None = None
    # outlier exposure: background images (no sign) appended to each batch at this fraction of the batch,
    # trained toward the uniform distribution with this loss weight (0 = off), so "no sign" scores low
    outlier_weight: float = 0.0
    outlier_fraction: float = 0.25

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.robust is not None:
            d['robust'] = self.robust.as_dict()
        return d


def outlier_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the uniform distribution (Hendrycks et al., Outlier Exposure, ICLR 2019)."""
    return -F.log_softmax(logits, dim=1).mean(dim=1).mean()


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

    @classmethod
    def join(cls, hists) -> History:
        """Consecutive phases as one history (steps and epochs continue from the previous phase)."""
        out = cls()
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


def fit(
    model,
    train: Split,
    val: Split | None,
    cfg: FitConfig,
    teacher_logits: np.ndarray | None = None,
    log=print,
    progress: bool = True,
    background: np.ndarray | None = None,
) -> History:
    """Train ``model`` in place; returns the loss/accuracy curves. ``background``: images of no sign
    for outlier exposure (used when ``cfg.outlier_weight > 0``)."""
    if cfg.alpha > 0 and teacher_logits is None:
        raise ValueError('alpha > 0 needs teacher logits')
    if teacher_logits is not None and len(teacher_logits) != len(train):
        raise ValueError(f'{len(teacher_logits)} teacher logits for {len(train)} training images')
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    aug_rng = np.random.default_rng([cfg.seed, 1])
    use_bg = cfg.outlier_weight > 0
    if use_bg and (background is None or not len(background)):
        raise ValueError('outlier_weight > 0 needs background images')
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
        imgs = train.images[idx]
        n_bg = max(1, int(round(bs * cfg.outlier_fraction))) if use_bg else 0
        if n_bg:
            imgs = np.concatenate([imgs, background[aug_rng.integers(0, len(background), n_bg)]])
        if cfg.robust is not None:
            imgs = cfg.robust(imgs, aug_rng)
        x = to_tensor_batch(imgs, mean, std, cfg.input_size, cfg.augment, gen, interp)
        y = labels_all[idx]
        out = model(x)
        logits = out[:len(idx)]
        loss = kd_loss(
            logits, tl[idx] if tl is not None else None, y, cfg.temperature, cfg.alpha, cfg.label_smoothing
        )
        if n_bg:
            loss = loss + cfg.outlier_weight * outlier_loss(out[len(idx):])
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
