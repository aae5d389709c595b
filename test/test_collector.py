"""adapt.collector: the adaptation node's data path without ROS (frames, labels, features -> store).

The messages are plain objects with the fields of sensor_msgs/Image, CompressedImage and the
perception node's ``~/features`` (the collector duck-types them); the engine, the store and the selector
are the real ones. ``process()`` runs the worker step synchronously, so no test sleeps or polls, except
the one that checks the worker thread itself.
"""

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from edge_tl_ros.adapt import AdaptConfig
from edge_tl_ros.adapt.collector import MAX_PENDING_LABELS, Collector, CollectorConfig
from edge_tl_ros.bundle import load_bundle
from edge_tl_ros.engine import Engine
from edge_tl_ros.imaging import encode_compressed, image_fields
from edge_tl_ros.store import FrameStore
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_features, toy_frames


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    return load_bundle(make_toy_bundle(tmp_path_factory.mktemp('bundle') / 'toy'))


def header(stamp_s: int, nsec: int = 0):
    return SimpleNamespace(stamp=SimpleNamespace(sec=stamp_s, nanosec=nsec), frame_id='cam')


def image_msg(img, stamp_s, encoding='rgb8'):
    return SimpleNamespace(header=header(stamp_s), **image_fields(img, encoding))


def compressed_msg(img, stamp_s):
    return SimpleNamespace(header=header(stamp_s), format='png',
                           data=encode_compressed(img, 'rgb', 'png'))


def features_msg(feats, stamp_s):
    f = np.asarray(feats, '<f4')
    return SimpleNamespace(header=header(stamp_s), encoding='32FC1', height=1, width=len(f), step=4 * len(f),
                           is_bigendian=0, data=f.tobytes())


def collector(toy, tmp_path, **cfg):
    engine = Engine(toy, 'feature_extractor', num_threads=1)
    store = FrameStore(tmp_path / 'store', crop_size=(16, 16), feature_size=toy.feature_size)
    logs = []
    c = Collector(engine, store, CollectorConfig(**{'sample_rate_hz': 0.0, **cfg}), AdaptConfig(),
                  log=logs.append)
    c.logs = logs
    return c


def test_labelled_frames_are_stored_whatever_arrives_first(toy, tmp_path):
    c = collector(toy, tmp_path)
    imgs, y = toy_frames(np.random.default_rng(0), 6)
    c.put_frame(image_msg(imgs[0], 100))  # frame, then its label
    c.process()
    assert len(c.store) == 0 and len(c.recent) == 1  # unlabelled, not sampled: only remembered
    assert c.put_label(100 * 10**9, TOY_CLASSES[y[0]]) is None
    c.process()
    assert c.put_label(101 * 10**9, TOY_CLASSES[y[1]]) is None  # label, then its frame
    c.process()
    assert c.pending_labels == 1
    c.put_frame(image_msg(imgs[1], 101))
    c.process()
    arr = c.store.entries()
    assert sorted(arr.stamps.tolist()) == [100 * 10**9, 101 * 10**9]
    assert sorted(arr.labels) == sorted(TOY_CLASSES[i] for i in y[:2]) and set(arr.sources) == {'topic'}
    # the stored features are the full frame's (one resize rule): the engine on the original image
    want = Engine(toy, 'feature_extractor').infer(imgs[0], 'rgb').features
    got = arr.features[list(arr.stamps).index(100 * 10**9)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert c.counters['labels_applied'] == 2 and c.since_round == 2 and c.pending_labels == 0


def test_a_label_for_a_stored_frame_relabels_it(toy, tmp_path):
    c = collector(toy, tmp_path, sample_rate_hz=1000.0, keep_fraction=1.0, selection='uniform')
    imgs, y = toy_frames(np.random.default_rng(1), 1)
    c.put_frame(image_msg(imgs[0], 5))
    c.process()
    assert len(c.store) == 1 and c.store.entries().labels == [None]
    c.put_label(5 * 10**9, 'blue')
    c.process()
    arr = c.store.entries()
    assert arr.labels == ['blue'] and arr.sources == ['topic'] and c.counters['labels_applied'] == 1


def test_bad_input_is_counted_by_reason_never_raised(toy, tmp_path):
    c = collector(toy, tmp_path)
    img = toy_frames(np.random.default_rng(2), 1)[0][0]
    bad = image_msg(img, 7)
    bad.data = bad.data[:10]  # short buffer
    c.put_frame(bad)
    neg = image_msg(img, 8)
    neg.header.stamp.sec = -1
    c.put_frame(neg)
    odd = image_msg(img, 9)
    odd.encoding = 'yuv9000'
    c.put_frame(odd)
    c.process()
    assert c.counters['frames_bad'] == 3 and c.counters['frames_handled'] == 3
    assert c.bad_frames['bad_stamp'] == 1 and c.bad_frames['unsupported_encoding'] == 1
    assert sum(c.bad_frames.values()) == 3, dict(c.bad_frames)  # and the short buffer, by its reason
    assert c.put_label(-5, 'red') == 'bad_stamp'
    assert c.put_label(10, '') == 'no_class_id'
    assert c.put_label(10, 'a\nb') == 'bad_class_name'
    assert dict(c.bad_labels) == {'bad_stamp': 1, 'no_class_id': 1, 'bad_class_name': 1}
    f = features_msg(np.full(toy.feature_size, np.nan), 3)
    assert c.put_features(f) == 'non_finite'
    f = features_msg(np.zeros(toy.feature_size + 1), 3)
    assert c.put_features(f) == 'shape'
    assert c.counters['features_bad'] == 2 and len(c.store) == 0
    assert len(c.logs) == 1  # one warning per kind and period, not one per frame


def test_compressed_frames_are_kept_compressed_until_a_label_claims_them(toy, tmp_path):
    c = collector(toy, tmp_path)
    imgs, y = toy_frames(np.random.default_rng(3), 2)
    c.put_frame(compressed_msg(imgs[0], 20))
    c.process()
    assert c.memory()['recent_frames'] == 1
    frame = c.recent.pop(20 * 10**9)
    assert frame.payload is not None and frame.crop is None  # not decoded: nobody needed it
    c.recent.put(frame)
    c.put_label(20 * 10**9, TOY_CLASSES[y[0]])
    c.process()
    arr = c.store.entries()
    assert arr.labels == [TOY_CLASSES[y[0]]]
    np.testing.assert_allclose(arr.features[0], toy_features(imgs[:1])[0], atol=1e-4)


def test_wipe_forgets_memory_and_store(toy, tmp_path):
    c = collector(toy, tmp_path, sample_rate_hz=1000.0, keep_fraction=1.0, selection='uniform')
    imgs, _ = toy_frames(np.random.default_rng(4), 3)
    c.put_frame(image_msg(imgs[0], 30))
    c.process()
    c.put_frame(image_msg(imgs[1], 31))  # queued, not yet processed
    c.put_label(99 * 10**9, 'red')  # pending
    c.process()
    assert len(c.store) >= 1 and c.pending_labels == 1
    n, left = c.wipe()
    assert n >= 1 and left == 0 and len(c.store) == 0 and len(c.recent) == 0 and c.pending_labels == 0
    assert c.since_round == 0 and c.memory()['queued_frames'] == 0


def test_pending_labels_are_bounded_and_expire(toy, tmp_path):
    c = collector(toy, tmp_path, label_pending_s=0.1)
    for i in range(MAX_PENDING_LABELS + 5):
        c.put_label(10**9 + i, 'red')
    c.process()
    assert c.pending_labels == MAX_PENDING_LABELS and c.counters['labels_expired'] == 5
    c._pending = {s: (n, t - 1.0) for s, (n, t) in c._pending.items()}  # aged past label_pending_s
    c.expire()
    assert c.pending_labels == 0 and c.counters['labels_expired'] == MAX_PENDING_LABELS + 5


def test_perception_features_are_used_by_stamp(toy, tmp_path):
    c = collector(toy, tmp_path)
    c.use_perception_features = True
    imgs, y = toy_frames(np.random.default_rng(5), 1)
    feats = np.linspace(-1, 1, toy.feature_size).astype(np.float32)  # recognisably not the frame's own
    assert c.put_features(features_msg(feats, 40)) is None
    c.put_frame(image_msg(imgs[0], 40))
    c.put_label(40 * 10**9, 'red')
    c.process()
    arr = c.store.entries()
    np.testing.assert_allclose(arr.features[0], feats)
    assert c.counters['features_reused'] == 1


def test_round_due_after_every_n_trainable_frames_on_the_worker_thread(toy, tmp_path):
    due = threading.Event()
    c = collector(toy, tmp_path, every_n_labels=3)
    c.on_round_due = due.set
    c.start()
    try:
        imgs, y = toy_frames(np.random.default_rng(6), 3)
        for i in range(3):
            c.put_label((50 + i) * 10**9, TOY_CLASSES[y[i]])
            c.put_frame(image_msg(imgs[i], 50 + i))
        assert due.wait(20), dict(c.counters)
        assert len(c.store) == 3 and c.since_round >= 3
    finally:
        c.close()
    assert not c._thread.is_alive()


def test_unlabelled_frames_count_toward_a_round_only_if_a_round_can_label_them(toy, tmp_path):
    c = collector(toy, tmp_path, sample_rate_hz=1000.0, keep_fraction=1.0, selection='uniform')
    imgs, _ = toy_frames(np.random.default_rng(7), 1)
    c.put_frame(image_msg(imgs[0], 60))
    c.process()
    assert len(c.store) == 1 and c.since_round == 0  # no teacher: nobody can label it
    c.has_teacher = True
    c.put_frame(image_msg(imgs[0], 61))
    c._last_sample = 0.0
    c.process()
    assert len(c.store) == 2 and c.since_round == 1


def test_config_is_checked(toy, tmp_path):
    with pytest.raises(ValueError, match='store.keep_fraction'):
        collector(toy, tmp_path, keep_fraction=2.0)
    with pytest.raises(ValueError, match='advanced.selection'):
        collector(toy, tmp_path, selection='greedy')
