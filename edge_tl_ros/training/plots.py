"""PNG plots (matplotlib, Agg backend): training curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories: dict[str, dict], path: str | Path, title: str = 'training curves') -> Path:
    """``histories``: label -> History.as_dict(); plots loss and train/val accuracy against epochs."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, h in histories.items():
        ep = h['epoch']
        ax1.plot(ep, h['train_loss'], marker='.', label=label)
        ax2.plot(ep, h['train_acc'], linestyle='--', marker='.', label=f'{label} train')
        if any(np.isfinite(v) for v in h['val_acc']):
            ax2.plot(ep, h['val_acc'], marker='o', label=f'{label} val')
    ax1.set_xlabel('epoch')
    ax1.set_ylabel('training loss')
    ax1.set_yscale('log')
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel('epoch')
    ax2.set_ylabel('accuracy')
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, class_names, path: str | Path, title: str = 'confusion matrix') -> Path:
    """Row-normalised confusion matrix (true class rows, predicted class columns)."""
    plt = _plt()
    cm = np.asarray(cm, np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    size = max(5.0, min(16.0, 0.28 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap='Blues', vmin=0, vmax=1)
    labels = [f'{i} {str(c)[:22]}' for i, c in enumerate(class_names)]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=6 if n > 20 else 8)
    ax.set_yticklabels(labels, fontsize=6 if n > 20 else 8)
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
