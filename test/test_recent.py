"""edge_tl_ros.recent: what the adaptation node keeps of recent frames (small crops, bounded by bytes)."""

import numpy as np
import pytest

from edge_tl_ros.imaging import downscale, resize_to
from edge_tl_ros.recent import ByteBoundedQueue, RecentFrame, RecentFrames, features_from_fields, shrink


def _frame(stamp, t=0.0, nbytes=1000):
    return RecentFrame(stamp, t, 0, payload=b'x' * nbytes, fmt='jpeg')


def test_shrink_keeps_small_owned_copies_and_matches_the_inference_rule():
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (1080, 1920, 3), np.uint8)
    view = full[:, :, :]  # a view, like the zero-copy view on a message buffer
    crop, small = shrink(view, 'bgr', (64, 64), (32, 32))
    assert crop.shape == (64, 64, 3) and small.shape == (32, 32, 3)
    assert crop.base is None and small.base is None  # nothing refers to the full frame any more
    assert crop.nbytes + small.nbytes < full.nbytes / 400
    np.testing.assert_array_equal(crop, downscale(full, 64, 64)[..., ::-1])  # bgr -> rgb
    # downscale is stride + resize_to, the engine's rule: the small image gives the same input tensor
    s = min(1080 // 64, 1920 // 64)
    np.testing.assert_array_equal(small, resize_to(full[::s, ::s], 32, 32))
    # a mono frame (H x W x 1) becomes H x W
    _, small_mono = shrink(full[:, :, :1], 'mono', (64, 64), (32, 32))
    assert small_mono.shape == (32, 32)


def test_recent_frames_bounded_by_bytes_count_and_age():
    r = RecentFrames(max_bytes=5000, max_entries=10, ttl_s=10.0)
    for i in range(20):
        r.put(_frame(i, t=float(i)))
        assert r.nbytes <= 5000 and len(r) <= 10
    assert len(r) == 5 and 19 in r and 14 not in r and r.evicted == 15
    assert r.pop(17).stamp == 17 and 17 not in r and r.nbytes == 4000
    assert r.pop(17) is None
    assert r.expire(now=27.5) == 2  # 15 and 16 are older than 10 s at t=27.5; 18, 19 are not
    assert sorted([s for s in range(20) if s in r]) == [18, 19]
    r.put(_frame(19, t=30.0, nbytes=10))  # same stamp replaces, bytes follow
    assert r.nbytes == 1010 and len(r) == 2
    # a frame bigger than the whole budget is still kept (the newest one always is)
    r.put(_frame(99, t=31.0, nbytes=50_000))
    assert len(r) == 1 and 99 in r
    assert r.clear() == 1 and r.nbytes == 0 and len(r) == 0
    with pytest.raises(ValueError):
        RecentFrames(max_bytes=0)


def test_byte_bounded_queue_keeps_the_newest_within_bytes():
    q = ByteBoundedQueue(max_bytes=10_000, max_items=4)
    for i in range(10):
        q.put(i, 3000)
        assert q.nbytes <= 10_000 and len(q) <= 4
    assert q.dropped == 7 and [q.get() for _ in range(4)] == [7, 8, 9, None]
    q.put('huge', 1 << 30)  # alone it stays: the worker must always get the newest frame
    assert len(q) == 1 and q.get() == 'huge' and q.nbytes == 0
    q.put(1, 10)
    assert q.clear() == 1 and not q


@pytest.mark.parametrize('fields, reason', [
    (dict(encoding='mono8'), 'encoding'),
    (dict(height=2), 'shape'),
    (dict(width=7), 'shape'),
    (dict(step=4 * 8 + 4), 'size'),
    (dict(data=b'\0' * 31), 'size'),  # short data used to kill the node (np.frombuffer count)
    (dict(data=b'\0' * 33), 'size'),
    (dict(data=np.array([np.nan] + [0] * 7, '<f4').tobytes()), 'non_finite'),
    (dict(data=np.array([np.inf] + [0] * 7, '<f4').tobytes()), 'non_finite'),
])
def test_features_message_validation(fields, reason):
    good = dict(encoding='32FC1', height=1, width=8, step=32, is_bigendian=0,
                data=np.arange(8, dtype='<f4').tobytes())
    feats, why = features_from_fields(**good, feature_size=8)
    assert why is None and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, np.arange(8))
    big = dict(good, is_bigendian=1, data=np.arange(8, dtype='>f4').tobytes())
    np.testing.assert_array_equal(features_from_fields(**big, feature_size=8)[0], np.arange(8))
    feats, why = features_from_fields(**{**good, **fields}, feature_size=8)
    assert feats is None and why == reason


def test_features_message_fuzz_never_raises():
    rng = np.random.default_rng(7)
    for _ in range(500):
        n = int(rng.integers(0, 80))
        data = rng.integers(0, 256, n, np.uint8).tobytes()
        feats, why = features_from_fields(
            str(rng.choice(['32FC1', 'mono8', '', '32FC1\0'])), int(rng.integers(0, 4)),
            int(rng.integers(0, 12)), int(rng.integers(0, 60)), int(rng.integers(0, 2)), data, 8)
        assert (feats is None) != (why is None)
        if feats is not None:
            assert feats.shape == (8,) and np.isfinite(feats).all()
