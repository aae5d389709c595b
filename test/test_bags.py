"""Bags: rosbag2 write/read in both storages, corrupt bags, make-bag / evaluate-bag CLIs, and replay to
real rclpy subscribers (own ROS domain per test via the ``ros_context`` fixture)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.bags.io import (
    CLASSIFICATION,
    COMPRESSED_IMAGE,
    IMAGE,
    BagError,
    bag_info,
    image_msg,
    label_msg,
    read_bag,
    read_labelled_frames,
    serialize,
    stamp_ns,
    typestore,
    write_bag,
)
from edge_tl_ros.imaging import encode_compressed

START = 1_700_000_000 * 10**9  # header stamp of frame 0 (ns)
CLASSES = ('red', 'green', 'blue')


def frames_and_labels(n=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, size, size + 4, 3), dtype=np.uint8)
    labels = [CLASSES[i % 3] for i in range(n)]
    return frames, labels


def storage_file(bag: Path) -> Path:
    return next(p for p in bag.iterdir() if p.suffix in ('.db3', '.mcap'))


# -- write / read -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
@pytest.mark.parametrize('kind', ['rgb8', 'bgr8', 'jpeg', 'png'])
def test_round_trip(tmp_path, storage, kind):
    frames, labels = frames_and_labels()
    fps = 20.0
    compressed = kind in ('jpeg', 'png')
    bag = write_bag(tmp_path / 'bag', frames, labels, fps=fps, storage=storage, compressed=compressed,
                    encoding=kind if not compressed else 'rgb8',
                    compressed_format=kind if compressed else 'jpeg', start_stamp=START,
                    metadata={'note': 'test'})
    info = bag_info(bag)
    img_topic = '/camera/image/compressed' if compressed else '/camera/image'
    img_type = COMPRESSED_IMAGE if compressed else IMAGE
    assert info.storage == storage
    assert {t: (i.msgtype, i.count) for t, i in info.topics.items()} == {
        img_topic: (img_type, 12), '/labels': (CLASSIFICATION, 12)}
    assert info.custom['note'] == 'test' and info.custom['class_names'] == sorted(CLASSES)
    assert info.custom['fps'] == fps

    msgs = list(read_bag(bag))
    assert len(msgs) == 24
    images = [m for m in msgs if m.topic == img_topic]
    labs = [m for m in msgs if m.topic == '/labels']
    period = int(1e9 / fps)
    for i, (im, lab) in enumerate(zip(images, labs)):
        topic, msgtype, t, raw = im  # unpacks as a 4-tuple
        assert (topic, msgtype) == (img_topic, img_type) and isinstance(raw, bytes)
        stamp = START + i * period
        assert t == stamp and lab.timestamp == stamp + 1_000_000  # label recorded 1 ms after the frame
        msg = im.msg
        assert stamp_ns(msg.header) == stamp and msg.header.frame_id == 'camera'
        if compressed:
            assert msg.format == f'rgb8; {kind} compressed bgr8'
            assert bytes(msg.data) == encode_compressed(frames[i], 'rgb', kind, 90)
        else:
            assert raw == serialize(image_msg(frames[i], stamp, encoding=kind), IMAGE)  # byte-identical
            assert (msg.height, msg.width, msg.encoding, msg.step) == (16, 20, kind, 60)
        lm = lab.msg
        assert stamp_ns(lm.header) == stamp and lm.header.frame_id == 'camera'
        assert [(r.class_id, r.score) for r in lm.results] == [(labels[i], 1.0)]
        assert lab.rawdata == serialize(label_msg(labels[i], stamp), CLASSIFICATION)

    imgs, names = read_labelled_frames(bag)
    assert names == labels and imgs.shape == frames.shape and imgs.dtype == np.uint8
    if kind == 'jpeg':
        assert np.abs(imgs.astype(int) - frames).mean() < 60  # noise frames compress badly; just sane
    else:
        np.testing.assert_array_equal(imgs, frames)

    # a bare storage file reads too (storage detected from the suffix)
    assert len(list(read_bag(storage_file(bag)))) == 24


def test_type_hashes_in_bag_match_upstream(tmp_path):
    """The RIHS01 hashes stored in the bag are those of upstream vision_msgs 4.x / sensor_msgs."""
    from rosbags.rosbag2 import Reader

    frames, labels = frames_and_labels(n=2)
    bag = write_bag(tmp_path / 'bag', frames, labels, storage='mcap', start_stamp=START)
    with Reader(bag) as r:
        digests = {c.msgtype: c.digest for c in r.connections}
    assert digests == {
        IMAGE: 'RIHS01_d31d41a9a4c4bc8eae9be757b0beed306564f7526c88ea6a4588fb9582527d47',
        CLASSIFICATION: 'RIHS01_f74db28d0eaef3afb78f48bf2161cd709a1383a0309d3454383b25be11345143'}


def test_pairing_by_header_stamp_not_order(tmp_path):
    """Labels recorded late, out of order, one frame unlabelled, one label without a frame."""
    from rosbags.rosbag2 import Writer

    frames, labels = frames_and_labels(n=6)
    ts = typestore()
    with Writer(tmp_path / 'bag', version=9) as w:
        ci = w.add_connection('/cam', IMAGE, typestore=ts)
        cl = w.add_connection('/labels', CLASSIFICATION, typestore=ts)
        stamps = [START + i * 10**8 for i in range(6)]
        for f, s in zip(frames, stamps):
            w.write(ci, s, serialize(image_msg(f, s, encoding='bgr8'), IMAGE))
        t = stamps[-1] + 10**9
        for i in (4, 2, 0, 5, 1):  # frame 3 gets no label
            w.write(cl, t, serialize(label_msg(labels[i], stamps[i]), CLASSIFICATION))
            t += 1000
        w.write(cl, t, serialize(label_msg('green', START - 5), CLASSIFICATION))  # no such frame
    imgs, names, got_stamps = read_labelled_frames(tmp_path / 'bag', return_stamps=True)
    assert names == [labels[i] for i in (0, 1, 2, 4, 5)]
    assert got_stamps.tolist() == [stamps[i] for i in (0, 1, 2, 4, 5)]
    np.testing.assert_array_equal(imgs, frames[[0, 1, 2, 4, 5]])
    with pytest.raises(BagError, match='no label topic'):
        read_labelled_frames(tmp_path / 'bag', label_topic='/nope')
    with pytest.raises(BagError, match='no topic'):
        read_labelled_frames(tmp_path / 'bag', image_topic='/nope')


def test_write_errors(tmp_path):
    frames, labels = frames_and_labels(n=3)
    bag = write_bag(tmp_path / 'b', frames, labels, start_stamp=START)
    with pytest.raises(BagError, match='exists already'):
        write_bag(bag, frames, labels)
    write_bag(bag, frames[:2], labels[:2], overwrite=True)  # replaces a bag directory
    assert bag_info(bag).topics['/camera/image'].count == 2
    (tmp_path / 'notabag').mkdir()
    with pytest.raises(BagError, match='not a rosbag2 bag directory'):
        write_bag(tmp_path / 'notabag', frames, labels, overwrite=True)
    with pytest.raises(BagError, match='choose one of sqlite3, mcap'):
        write_bag(tmp_path / 'c', frames, labels, storage='rosbag1')
    with pytest.raises(BagError, match='3 frames but 2 labels'):
        write_bag(tmp_path / 'c', frames, labels[:2])
    with pytest.raises(BagError, match='frame 0: expected RGB uint8'):
        write_bag(tmp_path / 'c', frames.astype(np.float32), labels)
    assert not (tmp_path / 'c').exists()  # a failed write leaves nothing behind


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_corrupt_bags_give_bag_error(tmp_path, storage):
    frames, labels = frames_and_labels(n=40, size=32)
    good = write_bag(tmp_path / 'good', frames, labels, storage=storage, start_stamp=START)
    size = storage_file(good).stat().st_size

    def variant(name):
        p = tmp_path / name
        shutil.copytree(good, p)
        return p

    for frac in (0.5, 0.95):
        bad = variant(f'trunc{frac}')
        os.truncate(storage_file(bad), int(size * frac))
        for fn in (bag_info, lambda p: list(read_bag(p)), read_labelled_frames):
            with pytest.raises(BagError, match=rf'trunc{frac}: cannot read the bag.*truncated or corrupt'):
                fn(bad)
    empty = variant('empty')
    os.truncate(storage_file(empty), 0)
    with pytest.raises(BagError, match='truncated or corrupt'):
        bag_info(empty)

    nometa = variant('nometa')
    (nometa / 'metadata.yaml').unlink()
    with pytest.raises(BagError, match='no metadata.yaml.*pass .*nometa'):
        list(read_bag(nometa))
    badmeta = variant('badmeta')
    (badmeta / 'metadata.yaml').write_text('rosbag2_bagfile_information: [')
    with pytest.raises(BagError, match='metadata.yaml is invalid'):
        bag_info(badmeta)
    with pytest.raises(BagError, match='bag not found'):
        bag_info(tmp_path / 'missing')
    (tmp_path / 'x.txt').write_text('hello')
    with pytest.raises(BagError, match='not a bag'):
        bag_info(tmp_path / 'x.txt')
    with pytest.raises(BagError, match=r"no topic\(s\) \['/nope'\]"):
        list(read_bag(good, ['/nope']))


# -- make-bag / evaluate-bag CLIs -------------------------------------------------------------------------

def tiny_npz(path, n_train=20, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    names = np.array(['stop', 'yield', 'priority road'])
    np.savez(path, X_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 3, n_train),
             X_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 3, n_test), class_names=names)
    return path


def test_make_bag_cli(tmp_path, capsys):
    from edge_tl_ros.bags.cli import make_frames
    from edge_tl_ros.cli import main

    npz = tiny_npz(tmp_path / 'tiny.npz')
    z = np.load(npz)
    out = tmp_path / 'seq'
    rc = main(['make-bag', str(out), '--data', str(npz), '--count', '8', '--order', 'sequential',
               '--upscale', '48', '--fps', '10', '--start-stamp', '1700000000', '--no-progress'])
    assert rc == 0, capsys.readouterr().err
    assert 'wrote' in capsys.readouterr().out
    imgs, names, stamps = read_labelled_frames(out, return_stamps=True)
    np.testing.assert_array_equal(imgs, make_frames(z['X_test'][:8], 48))
    assert names == [str(z['class_names'][y]) for y in z['y_test'][:8]]
    assert np.diff(stamps).tolist() == [100_000_000] * 7 and stamps[0] == START
    info = bag_info(out)
    assert info.custom['class_names'] == ['stop', 'yield', 'priority road'] and info.custom['shift'] is None

    out2 = tmp_path / 'fog'
    rc = main(['make-bag', str(out2), '--data', str(npz), '--split', 'train', '--count', '50', '--storage',
               'mcap', '--compressed', '--shift', 'fog', '--severity', '4', '--seed', '3', '--no-progress'])
    assert rc == 0, capsys.readouterr().err
    assert 'only 20 images' in capsys.readouterr().err  # count capped at the split size
    info = bag_info(out2)
    assert info.storage == 'mcap' and info.topics['/camera/image/compressed'].count == 20
    assert info.custom['shift'] == 'fog' and info.custom['severity'] == 4
    imgs, names = read_labelled_frames(out2)
    assert imgs.shape == (20, 64, 64, 3) and set(names) <= {'stop', 'yield', 'priority road'}

    assert main(['make-bag', str(tmp_path / 'x'), '--data', str(npz), '--shift', 'snow']) == 2
    assert 'choose one of night' in capsys.readouterr().err
    assert main(['make-bag', str(out), '--data', str(npz)]) == 2  # exists
    assert 'exists already' in capsys.readouterr().err
    assert main(['make-bag', str(tmp_path / 'y'), '--data', str(tmp_path / 'nothing.npz')]) == 2


def test_evaluate_bag(tmp_path, capsys, monkeypatch):
    from edge_tl_ros.bags.evaluate import evaluate_bag, running_accuracy
    from edge_tl_ros.cli import main
    from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_frames

    bundle = make_toy_bundle(tmp_path / 'toy', size=16)
    rng = np.random.default_rng(0)
    clean, lc = toy_frames(rng, 60, size=40)
    shifted, ls = toy_frames(rng, 240, size=40, shifted=True)
    frames = np.concatenate([clean, shifted])
    names = [TOY_CLASSES[i] for i in np.concatenate([lc, ls])]
    bag = write_bag(tmp_path / 'bag', frames, names, storage='mcap', compressed=True, start_stamp=START)

    plain = evaluate_bag(bag, bundle, window=30)
    assert plain.frames == plain.labelled == 300 and not plain.frame_errors
    assert plain.correct[:60].mean() > 0.95  # clean frames: the toy head is right
    assert plain.correct[60:].mean() < 0.5  # the toy colour shift fools it
    assert 0 < plain.latency_p50_ms <= plain.latency_p99_ms

    adapted = evaluate_bag(bag, bundle, window=30, adapt=True, adapt_every=40)
    assert adapted.adapt_note is None, adapted.adapt_note
    assert any(r.accepted for r in adapted.adapt_rounds)
    assert adapted.correct[-60:].mean() > plain.correct[-60:].mean() + 0.3
    assert adapted.accuracy > plain.accuracy

    np.testing.assert_allclose(running_accuracy(np.array([1, 0, 1, 1]), 2), [1, 0.5, 0.5, 1])

    png, js = tmp_path / 'out' / 'eval.png', tmp_path / 'eval.json'
    rc = main(['evaluate-bag', str(bag), '--bundle', str(bundle), '--adapt', '--adapt-every', '40',
               '--plot', str(png), '--json', str(js), '--no-progress'])
    assert rc == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary = json.loads(js.read_text())
    assert summary['labelled'] == 300 and summary['adapt_rounds']
    assert main(['evaluate-bag', str(tmp_path / 'nope'), '--bundle', str(bundle)]) == 2
    assert 'bag not found' in capsys.readouterr().err
    # the default bundle is the shipped student wherever the command runs (not a path relative to the cwd)
    from edge_tl_ros.bundle import default_model_path

    if (default_model_path() / 'manifest.yaml').is_file():
        monkeypatch.chdir(tmp_path)
        js = tmp_path / 'default.json'
        assert main(['evaluate-bag', str(bag), '--no-plot', '--no-progress', '--max-frames', '20',
                     '--json', str(js)]) == 0, capsys.readouterr().err
        assert json.loads(js.read_text())['bundle'] == str(default_model_path())


def _shifted_toy_bag(tmp_path, n=300, fps=2.0):
    """A bag of colour-shifted toy frames (all labelled), the toy student, a teacher that knows the shift."""
    from edge_tl_ros.headtrain import train_head
    from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_features, toy_frames, toy_head

    student = make_toy_bundle(tmp_path / 'toy', size=16)
    rng = np.random.default_rng(3)
    x, y = toy_frames(rng, 300, size=16, shifted=True)
    teacher_head = train_head(toy_features(x), y, toy_head(scale=3.0), l2_to_prior=1e-4)
    teacher = make_toy_bundle(tmp_path / 'teacher', size=16, head=teacher_head, name='teacher',
                              with_full=False)
    frames, labels = toy_frames(rng, n, size=40, shifted=True)
    bag = write_bag(tmp_path / 'shifted', frames, [TOY_CLASSES[i] for i in labels], storage='mcap', fps=fps,
                    start_stamp=START)
    return bag, student, teacher


def test_evaluate_bag_adapt_teacher_labels_and_held_out(tmp_path, capsys):
    """--labels teacher: the bag's labels only score, the teacher labels the sampled frames; the last
    --eval-fraction of the bag is scored before and after and never reaches the store."""
    from edge_tl_ros.cli import main

    bag, student, teacher = _shifted_toy_bag(tmp_path)
    js = tmp_path / 'teacher.json'
    png = tmp_path / 'teacher.png'
    rc = main(['evaluate-bag', str(bag), '--bundle', str(student), '--adapt', '--adapt-every', '40',
               '--labels', 'teacher', '--teacher-bundle', str(teacher), '--eval-fraction', '0.3',
               '--plot', str(png), '--json', str(js), '--no-progress'])
    out = capsys.readouterr().out
    assert rc == 0
    s = json.loads(js.read_text())
    assert s['label_sources'] == ['teacher'] and s['teacher'] == str(teacher)
    assert s['heldout_from_frame'] == 210 and s['heldout_labelled'] == 90
    assert s['adapt_frames'] == 210  # held-out frames never went to the simulated node
    assert s['adapt_store']['topic'] == 0 and s['adapt_store']['teacher'] >= 40, s['adapt_store']
    assert any(r['accepted'] for r in s['adapt_rounds'])
    assert all(r['detail']['label_counts']['topic'] == 0 for r in s['adapt_rounds'] if r['detail'].get(
        'label_counts'))
    before, after = s['heldout_accuracy_before'], s['heldout_accuracy_after']
    assert before < 0.5 and after > before + 0.3, s
    assert 'held-out frames 210..299' in out and 'before' in out and 'after' in out
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # without a teacher and without topic labels nothing can be learned: before == after, no round accepted
    js2 = tmp_path / 'none.json'
    assert main(['evaluate-bag', str(bag), '--bundle', str(student), '--adapt', '--adapt-every', '40',
                 '--labels', 'teacher', '--teacher-bundle', '', '--no-plot', '--json', str(js2),
                 '--no-progress']) == 0
    s2 = json.loads(js2.read_text())
    assert not any(r['accepted'] for r in s2['adapt_rounds'])
    assert s2['heldout_accuracy_after'] == s2['heldout_accuracy_before'] == s['heldout_accuracy_before']

    # topic labels: stored with their label
    js3 = tmp_path / 'topic.json'
    assert main(['evaluate-bag', str(bag), '--bundle', str(student), '--adapt', '--adapt-every', '40',
                 '--labels', 'topic', '--no-plot', '--json', str(js3), '--no-progress']) == 0
    s3 = json.loads(js3.read_text())
    assert s3['adapt_store']['topic'] == 210 and s3['adapt_store']['teacher'] == 0
    assert s3['heldout_accuracy_after'] > s3['heldout_accuracy_before'] + 0.3

    assert main(['evaluate-bag', str(bag), '--bundle', str(student), '--adapt', '--labels', 'oracle']) == 2
    assert 'labels.sources' in capsys.readouterr().err
    assert main(['evaluate-bag', str(bag), '--bundle', str(student), '--adapt', '--labels', 'teacher',
                 '--teacher-bundle', str(tmp_path / 'no_such_teacher')]) == 2
    assert 'no_such_teacher' in capsys.readouterr().err


def test_default_collection_makes_a_few_minutes_of_driving_enough(tmp_path):
    """With the shipped collector defaults a teacher-only drive of 3.5 min at 30 fps stores about the 500
    frames bench.adaptation measures with (the node samples by time; the simulation by bag time)."""
    from edge_tl_ros.adapt import AdaptConfig
    from edge_tl_ros.adapt.collector import CollectorConfig
    from edge_tl_ros.bags.evaluate import evaluate_bag
    from edge_tl_ros.toy import make_toy_bundle, toy_frames

    bundle = make_toy_bundle(tmp_path / 'toy', size=8)
    frames, _ = toy_frames(np.random.default_rng(0), 30 * 210, size=8, shifted=True)
    bag = write_bag(tmp_path / 'drive', frames, None, fps=30.0, storage='mcap', start_stamp=START)
    res = evaluate_bag(bag, bundle, adapt=True, adapt_every=10**6, adapt_config=AdaptConfig(),
                       teacher=bundle)  # any teacher: frames count as trainable; no round runs
    stored = res.adapt_store['unlabelled']
    cfg = CollectorConfig()
    expect = 210 * cfg.sample_rate_hz * cfg.keep_fraction
    assert 0.8 * expect <= stored <= 1.2 * expect and stored >= 400, (stored, expect)


def test_evaluate_bag_class_map(tmp_path, capsys):
    """--class-map maps the bag's own label names to the bundle's; unknown names are one clear error."""
    from edge_tl_ros.cli import main
    from edge_tl_ros.toy import make_toy_bundle, toy_frames

    bundle = make_toy_bundle(tmp_path / 'toy', size=16)
    frames, y = toy_frames(np.random.default_rng(0), 60, size=24)
    mine = ('rot', 'gruen', 'blau')
    bag = write_bag(tmp_path / 'mine', frames, [mine[i] for i in y], storage='mcap', start_stamp=START)
    js = tmp_path / 'e.json'
    args = ['evaluate-bag', str(bag), '--bundle', str(bundle), '--no-plot', '--no-progress',
            '--json', str(js)]
    assert main(args) == 0
    assert json.loads(js.read_text())['unknown_labels'] == 60  # without a map no label is a bundle class
    cmap = tmp_path / 'map.yaml'
    cmap.write_text('rot: red\ngruen: green\nblau: blue\n')
    assert main(args + ['--class-map', str(cmap)]) == 0
    s = json.loads(js.read_text())
    assert s['unknown_labels'] == 0 and s['labelled'] == 60 and s['accuracy'] > 0.95
    (tmp_path / 'map.json').write_text(json.dumps({'rot': 'red', 'gruen': 'green', 'blau': None}))
    assert main(args + ['--class-map', str(tmp_path / 'map.json')]) == 0
    assert json.loads(js.read_text())['labelled'] == int(np.sum(y != 2))  # null: frames of blau ignored
    cmap.write_text('rot: red\ngruen: gren\nblau: blue\n')
    assert main(args + ['--class-map', str(cmap)]) == 2
    err = capsys.readouterr().err
    assert "unknown class name(s) 'gren' (did you mean 'green'?)" in err and 'Traceback' not in err
    cmap.write_text('rot: red\ngruen: green\n')
    assert main(args + ['--class-map', str(cmap)]) == 2
    assert "labels 'blau' are neither in the class map" in capsys.readouterr().err
    cmap.write_text('[red, green]')
    assert main(args + ['--class-map', str(cmap)]) == 2
    assert 'must be a non-empty mapping' in capsys.readouterr().err
    assert main(args + ['--class-map', str(tmp_path / 'missing.yaml')]) == 2
    assert 'missing.yaml' in capsys.readouterr().err


def test_class_map_for_npz_labels(tmp_path, capsys):
    """make-bag and evaluate take the npz's own class names (or ids) through --class-map."""
    from edge_tl_ros.cli import main
    from edge_tl_ros.toy import make_toy_bundle, toy_frames

    bundle = make_toy_bundle(tmp_path / 'toy', size=16)
    x, y = toy_frames(np.random.default_rng(1), 40, size=32)
    npz = tmp_path / 'mine.npz'
    np.savez(npz, X_train=x[:20], y_train=y[:20], X_test=x[20:], y_test=y[20:],
             class_names=np.array(['rot', 'gruen', 'blau']))
    cmap = tmp_path / 'map.yaml'
    cmap.write_text('rot: red\n1: green\nblau: null\n')  # a name, an id, and a class left out
    out = tmp_path / 'bag'
    assert main(['make-bag', str(out), '--data', str(npz), '--count', '20', '--order', 'sequential',
                 '--class-map', str(cmap), '--bundle', str(bundle), '--no-progress']) == 0, \
        capsys.readouterr().err
    _, names = read_labelled_frames(out)
    want = [('red', 'green', None)[int(v)] for v in y[20:]]
    assert names == [n for n in want if n is not None]
    cmap.write_text('rot: red\n')
    assert main(['make-bag', str(tmp_path / 'b2'), '--data', str(npz), '--class-map', str(cmap),
                 '--bundle', str(bundle), '--no-progress']) == 2
    assert "data classes 'gruen', 'blau' are neither in the class map" in capsys.readouterr().err

    cmap.write_text('rot: red\ngruen: green\nblau: blue\n')
    ev = tmp_path / 'ev'
    assert main(['evaluate', str(bundle), '--data', str(npz), '--image-size', '32', '--no-latency',
                 '--mode', 'feature_extractor', '--out', str(ev), '--class-map', str(cmap)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep['accuracy'] > 0.95, rep
    cmap.write_text('rot: rouge\n')
    assert main(['evaluate', str(bundle), '--data', str(npz), '--image-size', '32', '--no-latency',
                 '--out', str(ev), '--class-map', str(cmap)]) == 2
    err = capsys.readouterr().err
    assert "unknown class name(s) 'rouge'" in err and 'Traceback' not in err


# -- replay (real rclpy) ----------------------------------------------------------------------------------

rclpy = pytest.importorskip('rclpy')


def _has_vision_msgs():
    try:
        import vision_msgs.msg  # noqa: F401
        return True
    except ImportError:
        return False


HAS_VISION = _has_vision_msgs()


class Sink:
    """A subscriber node on its own executor thread, recording (receive time, topic, message)."""

    def __init__(self, ctx, subs):
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        self.node = rclpy.create_node('bag_test_sink', context=ctx)
        self.got = []
        self.lock = threading.Lock()
        for topic, cls in subs.items():
            rel = ReliabilityPolicy.RELIABLE
            if isinstance(cls, tuple):  # (message class, 'best_effort')
                cls, rel = cls[0], ReliabilityPolicy.BEST_EFFORT
            qos = QoSProfile(depth=200, reliability=rel)
            self.node.create_subscription(cls, topic, lambda m, t=topic: self._on(t, m), qos)
        self.ex = SingleThreadedExecutor(context=ctx)
        self.ex.add_node(self.node)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()

    def _on(self, topic, msg):
        with self.lock:
            self.got.append((time.monotonic(), topic, msg))

    def of(self, topic):
        with self.lock:
            return [(t, m) for t, tp, m in self.got if tp == topic]

    def wait_for(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    return True
            time.sleep(0.01)
        return False

    def close(self):
        self.ex.shutdown()
        self.thread.join(5)
        self.node.destroy_node()


@pytest.fixture
def sink_factory(ros_context):
    sinks = []

    def make(subs):
        s = Sink(ros_context, subs)
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        s.close()


@pytest.fixture
def player_node(ros_context):
    node = rclpy.create_node('bag_test_player', context=ros_context)
    yield node
    node.destroy_node()


def test_replay_order_timing_remap(tmp_path, sink_factory, player_node):
    from sensor_msgs.msg import Image

    from edge_tl_ros.bags.replay import Replayer

    n, fps = 16, 20.0
    frames, labels = frames_and_labels(n=n)
    bag = write_bag(tmp_path / 'bag', frames, labels, fps=fps, storage='mcap', start_stamp=START)
    subs = {'/image': Image}
    topics = ['/camera/image']
    if HAS_VISION:
        from vision_msgs.msg import Classification

        subs['/labels'] = Classification
        topics.append('/labels')
    sink = sink_factory(subs)
    rep = Replayer(player_node, bag, remap=['/camera/image:=/image'], topics=topics, wait_for_subscribers=10)
    assert rep.out_topic('/camera/image') == '/image' and rep.out_topic('/labels') == '/labels'
    stats = rep.run()
    assert sink.wait_for(n * len(topics)), f'got {len(sink.got)}'
    assert stats.published['/image'] == n and stats.loops == 1 and stats.mode == 'serialized'

    imgs = sink.of('/image')
    period_ns = int(1e9 / fps)
    assert [stamp_ns(m.header) for _, m in imgs] == [START + i * period_ns for i in range(n)]  # all, in order
    for (_, m), f in zip(imgs, frames):
        assert m.encoding == 'rgb8' and bytes(m.data) == f.tobytes()
    # recorded timing: compare gaps relative to the recorded period (generous; machines are busy)
    gaps = np.diff([t for t, _ in imgs])
    assert 0.6 < np.median(gaps) * fps < 1.6, gaps
    span = imgs[-1][0] - imgs[0][0]
    assert span > 0.7 * (n - 1) / fps  # not played faster than recorded
    if HAS_VISION:
        labs = sink.of('/labels')
        assert [stamp_ns(m.header) for _, m in labs] == [START + i * period_ns for i in range(n)]
        assert [m.results[0].class_id for _, m in labs] == labels

    # twice the rate: gaps halve (relative to the first run's median)
    sink.got.clear()
    stats2 = Replayer(player_node, bag, rate=2.0, remap={'/camera/image': '/image'}, topics=['/camera/image'],
                      wait_for_subscribers=10).run()
    assert sink.wait_for(n)
    gaps2 = np.diff([t for t, _ in sink.of('/image')])
    assert 0.3 < np.median(gaps2) / np.median(gaps) < 0.75
    assert stats2.wall_time < stats.wall_time


def test_replay_start_offset_loop_and_deserialize(tmp_path, sink_factory, player_node):
    from sensor_msgs.msg import Image

    from edge_tl_ros.bags.replay import Replayer

    frames, labels = frames_and_labels(n=10)
    bag = write_bag(tmp_path / 'bag', frames, labels, fps=50.0, storage='sqlite3', start_stamp=START,
                    label_topic=None)
    sink = sink_factory({'/camera/image': Image})
    stats = Replayer(player_node, bag, start_offset=0.1, serialized=False, wait_for_subscribers=10).run()
    assert stats.mode == 'deserialized'
    assert sink.wait_for(5)
    got = [stamp_ns(m.header) for _, m in sink.of('/camera/image')]
    assert got == [START + i * 20_000_000 for i in range(5, 10)]

    sink.got.clear()
    stop = threading.Event()
    rep = Replayer(player_node, bag, rate=5.0, loop=True, wait_for_subscribers=10)
    th = threading.Thread(target=lambda: rep.run(stop), daemon=True)
    th.start()
    assert sink.wait_for(25, timeout=15)  # more than two passes
    stop.set()
    th.join(5)
    assert not th.is_alive()
    stamps = [stamp_ns(m.header) for _, m in sink.of('/camera/image')]
    assert stamps[:20] == [START + (i % 10) * 20_000_000 for i in range(20)]

    with pytest.raises(BagError, match='nothing to play after start offset'):
        Replayer(player_node, bag, start_offset=5.0).run()
    with pytest.raises(BagError, match='no such topic'):
        Replayer(player_node, bag, remap=['/nope:=/x'])
    with pytest.raises(BagError, match='expected FROM:=TO'):
        Replayer(player_node, bag, remap=['/camera/image'])
    with pytest.raises(BagError, match='choose one of reliable, best_effort'):
        Replayer(player_node, bag, image_qos='fast')


def test_replay_clock(tmp_path, sink_factory, player_node):
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image

    from edge_tl_ros.bags.replay import Replayer

    frames, labels = frames_and_labels(n=10)
    bag = write_bag(tmp_path / 'bag', frames, labels, fps=20.0, start_stamp=START, label_topic=None)
    sink = sink_factory({'/clock': Clock, '/camera/image': (Image, 'best_effort')})
    stats = Replayer(player_node, bag, clock=True, clock_hz=50.0, image_qos='best_effort',
                     wait_for_subscribers=10).run()
    assert sink.wait_for(10 + 5)
    time.sleep(0.2)
    clocks = [stamp_ns(type('H', (), {'stamp': m.clock})) for _, m in sink.of('/clock')]
    assert stats.clock_published >= 10 and len(clocks) >= 10  # ~0.45 s at 50 Hz, plus one per frame
    assert clocks == sorted(clocks)
    end = START + 9 * 50_000_000
    assert START <= clocks[0] <= START + 60_000_000 and end - 60_000_000 <= clocks[-1] <= end


def test_replay_cli(tmp_path, sink_factory, ros_domain, capsys):
    from sensor_msgs.msg import Image

    frames, labels = frames_and_labels(n=6)
    bag = write_bag(tmp_path / 'bag', frames, labels, fps=30.0, storage='mcap', start_stamp=START)
    sink = sink_factory({'/image': Image})
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain))
    args = [sys.executable, '-m', 'edge_tl_ros.cli', 'replay', str(bag), '--remap', '/camera/image:=/image',
            '--wait-for-subscribers', '10', '--rate', '2', '--topics', '/camera/image']
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert 'published' in r.stdout and '/image: 6' in r.stdout
    assert sink.wait_for(6)
    got = [stamp_ns(m.header) for _, m in sink.of('/image')]
    assert got == [START + round(i * 1e9 / 30) for i in range(6)]

    from edge_tl_ros.cli import main

    assert main(['replay', str(tmp_path / 'none')]) == 2  # fails before any rclpy setup
    assert 'bag not found' in capsys.readouterr().err
