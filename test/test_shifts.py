"""Domain shifts: shape/dtype kept, severity ordered, deterministic, clear errors."""

import numpy as np
import pytest

from edge_tl_ros.shifts import SHIFTS, apply_shift


def _images(n=6, size=32, seed=0):
    """Structured images (gradients, a coloured square, a disc) rather than pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
        img = c0 * xx[..., None] + c1 * yy[..., None]
        x0, y0 = rng.integers(2, size // 2, 2)
        img[y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(0, 1, 3)
        disc = (xx - 0.7) ** 2 + (yy - 0.7) ** 2 < 0.03
        img[disc] = rng.uniform(0, 1, 3)
        out.append(img)
    return (np.clip(np.stack(out), 0, 1) * 255).astype(np.uint8)


def _dist(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize('name', sorted(SHIFTS))
@pytest.mark.parametrize('size', [32, 64])
def test_shape_dtype_and_severity_order(name, size):
    x = _images(size=size)
    dists = []
    for sev in range(1, 6):
        y = apply_shift(x, name, sev, seed=3)
        assert y.shape == x.shape and y.dtype == np.uint8
        dists.append(_dist(x, y))
    assert dists[0] > 0.5, f'{name} severity 1 does nothing: {dists}'
    assert dists[-1] > 1.5 * dists[0], f'{name}: {dists}'
    # monotonic up to a small tolerance between neighbours
    for a, b in zip(dists, dists[1:]):
        assert b >= a * 0.97, f'{name} severity order broken: {dists}'


@pytest.mark.parametrize('name', sorted(SHIFTS))
def test_single_image_and_determinism(name):
    x = _images(n=3)
    a = apply_shift(x, name, 4, seed=11)
    b = apply_shift(x, name, 4, seed=11)
    np.testing.assert_array_equal(a, b)
    single = apply_shift(x[0], name, 4, seed=11)
    assert single.shape == x[0].shape and single.dtype == np.uint8
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(apply_shift(x, name, 2, g1), apply_shift(x, name, 2, g2))
    assert not np.shares_memory(a, x)


def test_random_shifts_depend_on_seed():
    x = _images(n=2)
    for name in ('night', 'rain', 'noise', 'colour_cast', 'fog'):
        assert not np.array_equal(apply_shift(x, name, 3, seed=1), apply_shift(x, name, 3, seed=2)), name


def test_bad_name_and_severity():
    x = _images(n=1)
    with pytest.raises(ValueError, match='choose one of.*night.*fog'):
        apply_shift(x, 'snow', 3)
    for bad in (0, 6, 2.5, '3', True):
        with pytest.raises(ValueError, match='severity must be an integer in 1..5'):
            apply_shift(x, 'fog', bad)
    with pytest.raises(ValueError, match='uint8'):
        apply_shift(x.astype(np.float32), 'fog', 1)
    with pytest.raises(ValueError, match='shape'):
        apply_shift(x[..., :2], 'fog', 1)
    assert apply_shift(x, 'color_cast', 1).shape == x.shape  # US spelling alias


def test_empty_batch():
    x = np.zeros((0, 8, 8, 3), np.uint8)
    assert apply_shift(x, 'night', 2).shape == (0, 8, 8, 3)
