"""Generic robustness augmentation (RandAugment / AugMix-style), applied to uint8 images at their stored
resolution before the batch is warped, upsampled and normalised (:func:`loop.to_tensor_batch`, which adds
the geometric part: rotation, zoom, shift, plus brightness/contrast jitter).

Each image gets, with probability ``p``, ``n_ops`` operations drawn from ``ops`` at a random magnitude
in ``[0.1, magnitude]`` each, then an independent random erasing (occlusion) with probability
``erase_p``. The operations are the generic ones robust models are trained with, not the benchmark's
shift list (:mod:`edge_tl_ros.shifts`); :data:`RESEMBLES` records which operations resemble which shift
family, so a leave-one-family-out check can train without them (``RobustAugment.without(family)``).

numpy + OpenCV only (no torch): cheap at 32x32 (tens of microseconds an image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

OPS = ('brightness', 'contrast', 'gamma', 'saturation', 'channel_gain', 'lowres', 'blur', 'noise', 'jpeg')

# which augmentation operations resemble each shift family of edge_tl_ros.shifts
RESEMBLES: dict[str, tuple[str, ...]] = {
    'night': ('brightness', 'gamma', 'noise'),
    'fog': ('contrast', 'saturation', 'blur'),
    'rain': ('blur', 'contrast', 'erase'),
    'blur': ('blur', 'lowres'),
    'motion_blur': ('blur', 'lowres'),
    'noise': ('noise',),
    'jpeg': ('jpeg', 'lowres'),
    'colour_cast': ('channel_gain', 'saturation'),
}


@dataclass(frozen=True)
class RobustAugment:
    ops: tuple[str, ...] = OPS
    n_ops: int = 2  # operations per augmented image (RandAugment's N)
    magnitude: float = 1.0  # upper bound of the per-operation random magnitude (0..1)
    p: float = 0.8  # fraction of images augmented at all
    erase_p: float = 0.25  # random erasing (occlusion) probability, independent of the ops
    enabled: bool = True

    def __post_init__(self):
        unknown = set(self.ops) - set(OPS)
        if unknown:
            raise ValueError(f'unknown augmentation ops {sorted(unknown)}; choose from {", ".join(OPS)}')
        if not 0.0 <= self.p <= 1.0 or not 0.0 <= self.erase_p <= 1.0 or not 0.0 < self.magnitude <= 1.0:
            raise ValueError('RobustAugment: p and erase_p must be in [0, 1], magnitude in (0, 1]')

    def without(self, family: str) -> RobustAugment:
        """The same augmentation without the operations that resemble shift ``family``."""
        if family not in RESEMBLES:
            raise ValueError(f'unknown shift family {family!r}; choose from {", ".join(RESEMBLES)}')
        drop = set(RESEMBLES[family])
        return replace(self, ops=tuple(o for o in self.ops if o not in drop),
                       erase_p=0.0 if 'erase' in drop else self.erase_p)

    def as_dict(self) -> dict:
        d = asdict(self)
        d['ops'] = list(self.ops)
        return d

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented copy of ``images`` (uint8 [N,H,W,3]); the input is never modified."""
        if not self.enabled or not len(images):
            return images
        out = np.array(images, copy=True)
        ops = self.ops
        for i in range(len(out)):
            img = out[i]
            if ops and rng.random() < self.p:
                for name in rng.choice(len(ops), size=min(self.n_ops, len(ops)), replace=False):
                    img = _OPS[ops[name]](img, rng.uniform(0.1, self.magnitude), rng)
            if rng.random() < self.erase_p:
                img = erase(img, rng)
            out[i] = img
        return out


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def brightness(img, m, rng):
    gain = 1.0 + rng.uniform(-0.75, 0.5) * m
    return _u8(img.astype(np.float32) * gain)


def contrast(img, m, rng):
    f = img.astype(np.float32)
    k = 1.0 + rng.uniform(-0.8, 0.5) * m
    return _u8((f - f.mean()) * k + f.mean())


def gamma(img, m, rng):
    g = float(np.exp(rng.uniform(-1.0, 1.0) * m * np.log(2.5)))
    lut = _u8(255.0 * (np.arange(256, dtype=np.float32) / 255.0) ** g)
    return lut[img]


def saturation(img, m, rng):
    f = img.astype(np.float32)
    grey = f @ np.array([0.299, 0.587, 0.114], np.float32)
    k = 1.0 + rng.uniform(-1.0, 0.6) * m
    return _u8(grey[..., None] + (f - grey[..., None]) * k)


def channel_gain(img, m, rng):
    g = 1.0 + rng.uniform(-0.35, 0.35, size=3).astype(np.float32) * m
    return _u8(img.astype(np.float32) * g)


def lowres(img, m, rng):
    h, w = img.shape[:2]
    s = max(4, int(round(min(h, w) * (1.0 - 0.75 * m))))
    small = cv2.resize(img, (max(1, s * w // min(h, w)), max(1, s * h // min(h, w))),
                       interpolation=cv2.INTER_AREA)
    back = cv2.INTER_NEAREST if rng.random() < 0.3 else cv2.INTER_LINEAR
    return cv2.resize(small, (w, h), interpolation=back)


def blur(img, m, rng):
    scale = min(img.shape[:2]) / 32.0
    if rng.random() < 0.5:
        sigma = 0.3 + 1.5 * m * scale
        return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    length = max(2, int(round((1 + 5 * m) * scale)))  # a line kernel at a random angle (movement)
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
    k = cv2.warpAffine(k, rot, (length, length))
    return cv2.filter2D(img, -1, k / max(k.sum(), 1e-6), borderType=cv2.BORDER_REFLECT)


def noise(img, m, rng):
    f = img.astype(np.float32)
    if rng.random() < 0.7:
        return _u8(f + rng.normal(0.0, 4 + 30 * m, size=f.shape).astype(np.float32))
    # signal-dependent (shot-like) noise
    return _u8(f + rng.normal(0.0, 1.0, size=f.shape).astype(np.float32) * np.sqrt(f + 1) * (0.5 + 2.5 * m))


def jpeg(img, m, rng):
    q = int(round(95 - 85 * m))
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else img


def erase(img, rng):
    """Random erasing: a rectangle of 4-30 % of the image filled with noise or one colour."""
    h, w = img.shape[:2]
    area = rng.uniform(0.04, 0.3) * h * w
    aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(3.3))))
    eh = int(min(h, max(1, round(np.sqrt(area * aspect)))))
    ew = int(min(w, max(1, round(np.sqrt(area / aspect)))))
    y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
    out = img.copy()
    fill = rng.integers(0, 256, size=(eh, ew, 3)) if rng.random() < 0.5 else rng.integers(0, 256, size=3)
    out[y:y + eh, x:x + ew] = fill
    return out


_OPS = {'brightness': brightness, 'contrast': contrast, 'gamma': gamma, 'saturation': saturation,
        'channel_gain': channel_gain, 'lowres': lowres, 'blur': blur, 'noise': noise, 'jpeg': jpeg}
