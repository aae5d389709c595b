"""Synthetic domain shifts for camera frames (numpy + OpenCV only; no ROS, no torch).

Every shift takes RGB uint8 images ``[H,W,3]`` or batches ``[N,H,W,3]`` and returns the same shape and
dtype. ``severity`` is 1 (mild) .. 5 (severe), and the result is deterministic given ``seed`` (an int
or a ``np.random.Generator``): the same seed draws the same noise pattern / streak layout / cast
direction at every severity, so a higher severity only moves the image further from the original.

Sizes (blur radius, streak length) scale with the image: parameters are defined for a 32-pixel image
and scaled by ``min(H, W) / 32``, so a 64-pixel upscaled camera crop gets the same *look* as a 32-pixel
dataset image.

    >>> from edge_tl_ros.shifts import apply_shift, SHIFTS
    >>> night = apply_shift(frames, 'night', severity=3, seed=0)
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)


def _scale(x: np.ndarray) -> float:
    return max(min(x.shape[1], x.shape[2]) / 32.0, 0.25)


def _to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) * (1.0 / 255.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _pick(table, severity):
    return table[severity - 1]


# -- shifts: (batch uint8 [N,H,W,3], severity 1..5, rng) -> batch uint8 --------------------------------

def night(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Low light: darken, gamma (crushes shadows), blue tint, and signal-dependent sensor noise."""
    brightness = _pick((0.62, 0.48, 0.36, 0.27, 0.20), severity)
    gamma = _pick((1.15, 1.3, 1.45, 1.6, 1.8), severity)
    tint = _pick((0.04, 0.08, 0.12, 0.16, 0.20), severity)
    noise = _pick((0.012, 0.020, 0.028, 0.036, 0.045), severity)
    f = _to_float(x)
    f = np.power(f, gamma) * brightness
    gains = np.array([1.0 - tint, 1.0 - tint / 2, 1.0 + tint], np.float32)
    f *= gains
    # shot noise grows with the signal, read noise is constant
    n = rng.standard_normal(f.shape, dtype=np.float32)
    f += n * (noise * (0.5 + np.sqrt(np.maximum(f, 0.0))))
    return _to_uint8(f)


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Fog/haze: contrast loss and a blend toward a light grey veil that varies smoothly in space."""
    density = _pick((0.25, 0.38, 0.50, 0.62, 0.74), severity)
    contrast = _pick((0.85, 0.72, 0.60, 0.48, 0.38), severity)
    f = _to_float(x)
    n, h, w, _ = f.shape
    mean = f.mean(axis=(1, 2, 3), keepdims=True)
    f = (f - mean) * contrast + mean
    # smooth veil: low-resolution random field upsampled (same layout at every severity for a seed)
    low = rng.uniform(0.75, 1.0, (n, 4, 4)).astype(np.float32)
    veil = np.stack([cv2.resize(v, (w, h), interpolation=cv2.INTER_CUBIC) for v in low])[..., None]
    t = np.clip(density * veil, 0.0, 0.95)
    grey = np.float32(0.78)
    f = f * (1.0 - t) + grey * t
    return _to_uint8(f)


def _line_kernel(length: int, angle_deg: float) -> np.ndarray:
    length = max(1, int(length))
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    dx, dy = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    cv2.line(k, (int(round(c - dx * c)), int(round(c - dy * c))),
             (int(round(c + dx * c)), int(round(c + dy * c))), 1.0, 1)
    s = k.sum()
    return k / s if s > 0 else np.ones((1, 1), np.float32)


def rain(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rain: bright, slanted, slightly blurred streaks plus a small overall darkening."""
    density = _pick((0.004, 0.008, 0.013, 0.02, 0.03), severity)
    length = _pick((4, 5, 6, 8, 10), severity)
    alpha = _pick((0.35, 0.45, 0.55, 0.62, 0.70), severity)
    darken = _pick((0.95, 0.92, 0.88, 0.85, 0.82), severity)
    s = _scale(x)
    f = _to_float(x) * darken
    n, h, w, _ = f.shape
    # same drop field at every severity: threshold one uniform draw
    u = rng.random((n, h, w), dtype=np.float32)
    angles = rng.uniform(60.0, 80.0, n)
    kl = max(3, int(round(length * s)))
    out = np.empty_like(f)
    for i in range(n):
        drops = (u[i] < density).astype(np.float32)
        k = _line_kernel(kl, float(angles[i]))
        streak = cv2.filter2D(drops, -1, k * kl, borderType=cv2.BORDER_CONSTANT)
        streak = np.clip(streak, 0.0, 1.0)
        if s >= 1.5:
            streak = cv2.GaussianBlur(streak, (3, 3), 0.6)
        a = (alpha * streak)[..., None]
        out[i] = f[i] * (1.0 - a) + 0.85 * a
    return _to_uint8(out)


def blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian defocus blur."""
    sigma = _pick((0.5, 0.8, 1.1, 1.5, 2.0), severity) * _scale(x)
    ksize = 2 * int(np.ceil(3 * sigma)) + 1
    return np.stack([cv2.GaussianBlur(im, (ksize, ksize), sigma, borderType=cv2.BORDER_REFLECT)
                     for im in x])


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Linear motion blur (a moving robot / camera shake); the direction is drawn per image."""
    half = max(1, int(round(_pick((1, 2, 3, 4, 5), severity) * _scale(x))))
    length = 2 * half + 1  # odd: the kernel is centred, the image does not move
    angles = rng.uniform(-30.0, 30.0, len(x))
    return np.stack([cv2.filter2D(im, -1, _line_kernel(length, float(a)), borderType=cv2.BORDER_REFLECT)
                     for im, a in zip(x, angles)])


def noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian sensor noise."""
    std = _pick((0.04, 0.07, 0.10, 0.14, 0.19), severity)
    f = _to_float(x)
    f += rng.standard_normal(f.shape, dtype=np.float32) * std
    return _to_uint8(f)


def jpeg(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Re-encode as low-quality JPEG (blocking, ringing, chroma loss)."""
    quality = _pick((40, 25, 15, 10, 6), severity)
    out = np.empty_like(x)
    for i, im in enumerate(x):
        bgr = cv2.cvtColor(im, cv2.COLOR_RGB2BGR)
        ok, enc = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError('OpenCV failed to JPEG-encode the image')
        out[i] = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out


def colour_cast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """White-balance error: per-channel gains along a random direction (one per call)."""
    strength = _pick((0.12, 0.22, 0.32, 0.42, 0.52), severity)
    d = rng.standard_normal(3).astype(np.float32)
    d -= d.mean()  # keep overall brightness roughly constant
    d /= max(float(np.abs(d).max()), 1e-6)
    gains = 1.0 + strength * d
    f = _to_float(x) * gains
    return _to_uint8(f)


SHIFTS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    'night': night,
    'fog': fog,
    'rain': rain,
    'blur': blur,
    'motion_blur': motion_blur,
    'noise': noise,
    'jpeg': jpeg,
    'colour_cast': colour_cast,
}
ALIASES = {'color_cast': 'colour_cast', 'gaussian_blur': 'blur', 'gaussian_noise': 'noise',
           'motion': 'motion_blur'}


def shift_names() -> tuple[str, ...]:
    return tuple(SHIFTS)


def check_shift(name: str, severity: int) -> str:
    """Validate ``name``/``severity``; returns the canonical shift name. Raises ValueError."""
    canon = ALIASES.get(name, name)
    if canon not in SHIFTS:
        raise ValueError(f'unknown shift {name!r}; choose one of {", ".join(SHIFTS)}')
    is_int = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not is_int or severity not in SEVERITIES:
        raise ValueError(f'severity must be an integer in {SEVERITIES[0]}..{SEVERITIES[-1]}, '
                         f'got {severity!r}')
    return canon


def apply_shift(images: np.ndarray, name: str, severity: int = 3,
                seed: int | np.random.Generator | None = 0) -> np.ndarray:
    """Apply shift ``name`` at ``severity`` (1..5) to RGB uint8 ``[H,W,3]`` or ``[N,H,W,3]`` images.

    Returns a new array of the same shape and dtype. Deterministic for an int ``seed``; a
    ``np.random.Generator`` is used (and advanced) as given.
    """
    canon = check_shift(name, severity)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f'images must be uint8 RGB, got dtype {images.dtype}')
    single = images.ndim == 3
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f'images must be [H,W,3] or [N,H,W,3] RGB, got shape {images.shape}')
    batch = np.ascontiguousarray(images[None] if single else images)
    if batch.shape[0] == 0:
        return images.copy()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = SHIFTS[canon](batch, int(severity), rng)
    assert out.shape == batch.shape and out.dtype == np.uint8
    return out[0] if single else out
