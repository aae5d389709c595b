"""Road scenes in the GTSDB layout (numpy + OpenCV; no ROS, no torch).

A folder holds ``images/*.jpg`` (or .png/.ppm) and ``gt.txt`` with one line per sign,
``file;left;top;right;bottom;class_id`` in the images' pixels (``../shared/data/gtsdb``: 900 scenes at
1024x602, official split 00000-00599 train, 00600-00899 test).

- :func:`load_scenes`: the annotations, per image, with a ``split`` filter.
- :func:`sign_crops`: the annotated signs cropped (with context margin) and resized, with their labels.
- :func:`background_crops`: random square windows that touch no annotated sign, resized: the "no sign"
  input a classifier must reject (scale-matched to the signs: 12-128 px windows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.ppm')
TRAIN_IDS = range(0, 600)  # the official GTSDB split
TEST_IDS = range(600, 900)


class SceneError(ValueError):
    pass


@dataclass
class Scene:
    path: Path
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))  # [K,4] l,t,r,b
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [K]


def find_gtsdb(path: str | os.PathLike | None = None) -> Path:
    from .data import default_data_path

    p = Path(path).expanduser() if path else default_data_path() / 'gtsdb'
    if not (p / 'gt.txt').is_file() or not (p / 'images').is_dir():
        raise SceneError(f'{p}: not a GTSDB-layout folder (needs images/ and gt.txt '
                         '"file;left;top;right;bottom;class_id")')
    return p


def _image_id(name: str) -> int | None:
    stem = Path(name).stem
    return int(stem) if stem.isdigit() else None


def load_scenes(path=None, split: str = 'all') -> list[Scene]:
    """Every image of the folder with its boxes; ``split`` = ``train`` / ``test`` (GTSDB numbering) or
    ``all``. A malformed gt.txt line raises :class:`SceneError` naming the line."""
    root = find_gtsdb(path)
    if split not in ('train', 'test', 'all'):
        raise SceneError(f'split must be train, test or all, not {split!r}')
    ids = {'train': TRAIN_IDS, 'test': TEST_IDS}.get(split)
    files = sorted(f for f in (root / 'images').iterdir() if f.suffix.lower() in IMAGE_EXTS)
    boxes: dict[str, list] = {}
    for no, line in enumerate((root / 'gt.txt').read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(';')
        try:
            name, x0, t, r, b, c = parts[0], *map(int, parts[1:6])
        except (ValueError, IndexError):
            raise SceneError(f'{root / "gt.txt"}:{no}: expected file;left;top;right;bottom;class_id, '
                             f'got {line.strip()!r}') from None
        if r <= x0 or b <= t:
            raise SceneError(f'{root / "gt.txt"}:{no}: empty box {x0},{t},{r},{b}')
        boxes.setdefault(name, []).append((x0, t, r, b, c))
    out = []
    for f in files:
        i = _image_id(f.name)
        if ids is not None and (i is None or i not in ids):
            continue
        rows = np.array(boxes.get(f.name, []), np.int64).reshape(-1, 5)
        out.append(Scene(f, rows[:, :4], rows[:, 4]))
    return out


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SceneError(f'{path}: unreadable image')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _crop_square(img: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    half = side / 2
    x0, y0 = int(round(cx - half)), int(round(cy - half))
    x1, y1 = int(round(cx + half)), int(round(cy + half))
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    crop = img[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def sign_crops(path=None, split: str = 'train', size: int = 32, margin: float = 0.1,
               scenes: list[Scene] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Annotated signs as square crops with ``margin`` context on each side (GTSRB crops have ~10 %),
    resized to ``size``: (images uint8 [N,size,size,3] RGB, labels [N])."""
    scenes = load_scenes(path, split) if scenes is None else scenes
    imgs, labels = [], []
    for s in scenes:
        if not len(s.boxes):
            continue
        img = _read(s.path)
        for (x0, t, r, b), c in zip(s.boxes, s.labels):
            side = max(r - x0, b - t) * (1 + 2 * margin)
            imgs.append(_crop_square(img, (x0 + r) / 2, (t + b) / 2, side, size))
            labels.append(int(c))
    return (np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)), np.array(labels, np.int64)


def background_crops(path=None, split: str = 'train', per_scene: int = 10, size: int = 32,
                     min_side: int = 12, max_side: int = 128, seed: int = 0,
                     scenes: list[Scene] | None = None) -> np.ndarray:
    """Random square windows (side log-uniform in ``[min_side, max_side]`` px) that overlap no annotated
    sign, resized to ``size``: uint8 [N,size,size,3] RGB. Deterministic given ``seed``."""
    scenes = load_scenes(path, split) if scenes is None else scenes
    rng = np.random.default_rng(seed)
    out = []
    for s in scenes:
        img = _read(s.path)
        h, w = img.shape[:2]
        hi = min(max_side, h, w)  # a scene smaller than max_side: windows up to its short side
        if hi < min_side:
            continue
        got, tries = 0, 0
        while got < per_scene and tries < per_scene * 20:
            tries += 1
            side = float(np.exp(rng.uniform(np.log(min_side), np.log(hi))))
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            x1, y1 = x0 + side, y0 + side
            b = s.boxes
            if len(b) and np.any((b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)):
                continue
            out.append(_crop_square(img, x0 + side / 2, y0 + side / 2, side, size))
            got += 1
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)
