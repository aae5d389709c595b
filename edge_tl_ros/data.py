"""Datasets as plain numpy arrays (no torch, no ROS): images [N,H,W,3] uint8 RGB, labels [N] int64.

Supported sources (``load_dataset``): the GTSRB npz layout of ``../shared/data/gtsrb32.npz``; more
layouts are added by :mod:`edge_tl_ros.training.datasets`. The data path comes from a flag or the
``EDGE_TL_DATA`` environment variable; :func:`default_data_path` finds ``../shared/data`` beside the repo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_ENV = 'EDGE_TL_DATA'
GTSRB_NPZ = 'gtsrb32.npz'


class DataError(FileNotFoundError):
    pass


@dataclass
class Split:
    images: np.ndarray  # [N,H,W,3] uint8 RGB
    labels: np.ndarray  # [N] int64
    class_names: tuple[str, ...]

    def __len__(self):
        return len(self.labels)

    def subset(self, idx) -> 'Split':
        return Split(self.images[idx], self.labels[idx], self.class_names)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_data_path() -> Path:
    """``$EDGE_TL_DATA`` if set, else ``../shared/data`` beside the repository (or the CWD)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    for base in (repo_root(), Path.cwd()):
        cand = base.parent / 'shared' / 'data'
        if cand.is_dir():
            return cand
    return repo_root().parent / 'shared' / 'data'


def find_gtsrb_npz(path: str | os.PathLike | None = None) -> Path:
    p = Path(path).expanduser() if path else default_data_path()
    if p.is_dir():
        p = p / GTSRB_NPZ
    if not p.is_file():
        raise DataError(
            f'GTSRB data not found at {p}. Point --data or ${DATA_ENV} at gtsrb32.npz (or its folder), '
            'or fetch the official archive with `edge-tl download-gtsrb --out DIR`.')
    return p


def load_gtsrb_npz(path: str | os.PathLike | None = None) -> tuple[Split, Split]:
    """(train, test) splits of the GTSRB npz (official split)."""
    p = find_gtsrb_npz(path)
    with np.load(p, allow_pickle=False) as z:
        names = tuple(str(s) for s in z['class_names'])
        train = Split(z['X_train'], z['y_train'].astype(np.int64), names)
        test = Split(z['X_test'], z['y_test'].astype(np.int64), names)
    return train, test


def track_split(labels: np.ndarray, val_fraction: float = 0.1, track_len: int = 30,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train/val by whole *tracks* (runs of consecutive images of one sign).

    GTSRB's training set holds ~30 consecutive photos of each physical sign; a random split leaks
    near-duplicates into validation. Tracks are cut at label changes and every ``track_len`` images.
    """
    n = len(labels)
    starts = [0]
    for i in range(1, n):
        if labels[i] != labels[i - 1] or i - starts[-1] >= track_len:
            starts.append(i)
    starts.append(n)
    tracks = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tracks))
    n_val = max(1, int(round(len(tracks) * val_fraction)))
    val = np.concatenate([tracks[i] for i in order[:n_val]])
    train = np.concatenate([tracks[i] for i in order[n_val:]])
    return np.sort(train), np.sort(val)
