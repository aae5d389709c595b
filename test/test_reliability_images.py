"""Bad images: every sensor_msgs encoding the node does not support, impossible geometry, huge frames,
corrupt / truncated / mislabelled JPEG and PNG. Each is rejected with a reason key, counted in
/diagnostics (``rejected.<reason>``, read over real DDS), logged at a throttled rate, and the next valid
frame is classified. The adaptation node counts its bad frames the same way and loses no label.

Unit level (no ROS): ``image_view`` / ``decode_compressed`` + ``Engine.infer`` never raise anything but
``FrameError`` on garbage, and a huge frame (raw or compressed) is refused without allocating it.
"""

import re
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from edge_tl_ros.imaging import (SUPPORTED_ENCODINGS, FrameError, compressed_size, decode_compressed,
                                 encode_compressed, image_fields, image_view)
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle

# sensor_msgs/image_encodings.hpp (ROS 2 Jazzy/Rolling), in the header's order
ALL_ENCODINGS = (
    'rgb8', 'rgba8', 'rgb16', 'rgba16', 'bgr8', 'bgra8', 'bgr16', 'bgra16', 'mono8', 'mono16',
    *(f'{bits}{t}C{c}' for bits, t in (('8', 'U'), ('8', 'S'), ('16', 'U'), ('16', 'S'), ('32', 'S'),
                                      ('32', 'F'), ('64', 'F')) for c in (1, 2, 3, 4)),
    'bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8',
    'bayer_rggb16', 'bayer_bggr16', 'bayer_gbrg16', 'bayer_grbg16',
    'uyvy', 'yuv422', 'yuyv', 'yuv422_yuy2', 'nv12', 'nv21', 'nv24',
)
UNSUPPORTED = tuple(e for e in ALL_ENCODINGS if e not in SUPPORTED_ENCODINGS)
HEADER = Path(__file__).resolve().parents[1] / '.venv/include/sensor_msgs/sensor_msgs/image_encodings.hpp'
COLOURS = {'red': (220, 30, 30), 'green': (30, 220, 30), 'blue': (30, 30, 220)}


def solid(name, h=24, w=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = COLOURS[name]
    return img


def test_encoding_list_matches_the_installed_header():
    if not HEADER.is_file():
        pytest.skip(f'{HEADER} not installed; using the list from the ROS 2 header')
    names = set(re.findall(r'const (?:char|std::string) \w+\[\] *= *"([^"]+)"', HEADER.read_text()))
    assert names <= set(ALL_ENCODINGS), names - set(ALL_ENCODINGS)
    assert len(UNSUPPORTED) == len(ALL_ENCODINGS) - len(SUPPORTED_ENCODINGS) == 42


@pytest.mark.parametrize('encoding', UNSUPPORTED)
def test_unsupported_encoding_rejected(encoding):
    with pytest.raises(FrameError) as e:
        image_view(encoding, 4, 4, 64, 0, bytes(256))
    assert e.value.reason == 'unsupported_encoding' and encoding in str(e.value)


def _view(enc, h, w, step, data, big=0):
    return image_view(enc, h, w, step, big, data)


@pytest.mark.parametrize('case, reason', [
    (('rgb8', 0, 0, 0, b''), 'empty_image'),
    (('rgb8', 0, 5, 15, b''), 'empty_image'),
    (('mono8', 7, 0, 0, bytes(7)), 'empty_image'),
    (('rgb8', 4, 4, 8, bytes(64)), 'bad_step'),  # step < width * 3
    (('mono16', 4, 4, 6, bytes(64)), 'bad_step'),  # step < width * 2
    (('mono16', 4, 4, 9, bytes(64)), 'bad_step'),  # not a multiple of 2
    (('rgb8', 4, 4, 12, bytes(47)), 'short_data'),
    (('rgb8', 4, 4, 20, bytes(4 * 12)), 'short_data'),  # step > row: rows need the padding too
    (('bgr16', 2, 2, 12, bytes(23)), 'short_data'),
    (('rgb8', 8000, 8000, 24000, b''), 'too_large'),
    (('mono8', 1, 2**31, 2**31, b''), 'too_large'),
    (('rgb8', 2, 2, 2**32 - 1, bytes(12)), 'short_data'),
])
def test_bad_geometry_rejected_with_reason(case, reason):
    with pytest.raises(FrameError) as e:
        _view(*case)
    assert e.value.reason == reason


def test_odd_but_valid_geometry_accepted(tmp_path):
    from edge_tl_ros.bundle import load_bundle
    from edge_tl_ros.engine import Engine

    eng = Engine(load_bundle(make_toy_bundle(tmp_path / 'toy')))
    # 1x1 and 1xN frames classify
    img, order = _view('rgb8', 1, 1, 3, bytes(COLOURS['blue']))
    assert TOY_CLASSES[eng.infer(img, order).topk(1)[0][0]] == 'blue'
    img, order = _view('rgb8', 1, 5000, 15000, bytes(COLOURS['red']) * 5000)
    assert TOY_CLASSES[eng.infer(img, order).topk(1)[0][0]] == 'red'
    # the last row without its padding (data = (h-1)*step + row) is enough, 8 and 16 bit
    assert _view('rgb8', 2, 2, 8, bytes(14))[0].shape == (2, 2, 3)
    assert _view('mono16', 2, 2, 8, bytes(12))[0].shape == (2, 2, 1)
    # big-endian 16-bit: the same pixels as little-endian; the flag is ignored for 8-bit
    px = (np.arange(12, dtype=np.uint16) * 5000).reshape(2, 2, 3)
    le = _view('rgb16', 2, 2, 12, px.astype('<u2').tobytes())[0]
    be = _view('rgb16', 2, 2, 12, px.astype('>u2').tobytes(), big=1)[0]
    assert np.array_equal(le, be) and np.array_equal(le, (px >> 8).astype(np.uint8))
    assert np.array_equal(_view('rgb8', 1, 2, 6, bytes(range(6)), big=1)[0].ravel(), np.arange(6))


def test_huge_frames_rejected_without_allocating_them():
    raw = bytes(8000 * 8000 * 3)  # a real 8000x8000 rgb8 payload (allocated before tracing starts)
    png = encode_compressed(np.zeros((8000, 8000, 3), np.uint8), 'bgr', 'png')  # ~190 KB, 192 MB decoded
    jpg = encode_compressed(np.zeros((8000, 8000, 3), np.uint8), 'bgr', 'jpeg', quality=10)
    assert compressed_size('png', png) == (8000, 8000) and compressed_size('jpeg', jpg) == (8000, 8000)
    tracemalloc.start()
    try:
        for fn in (lambda: image_view('rgb8', 8000, 8000, 24000, 0, raw),
                   lambda: image_view('rgb16', 8000, 8000, 48000, 0, raw),
                   lambda: decode_compressed('png', png), lambda: decode_compressed('jpeg', jpg)):
            with pytest.raises(FrameError) as e:
                fn()
            assert e.value.reason == 'too_large'
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f'{peak / 2**20:.1f} MiB allocated while rejecting'
    # a 128-byte PNG whose IDAT length field says 3.2 GB: refused at once, nothing allocated (OpenCV's own
    # allocations are not traced: the process' peak RSS must not move, and it must be fast)
    import resource
    bomb = next(f[2] for f in compressed_faults() if f[0] == 'png chunk length 3 GB')
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(20):
        with pytest.raises(FrameError):
            decode_compressed('png', bomb)
    assert time.perf_counter() - t0 < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 100 * 1024  # KiB


def compressed_faults():
    """(name, format, payload, reason): the CompressedImage faults, with the reason each must get."""
    jpg = encode_compressed(solid('red'), 'rgb', 'jpeg')
    png = encode_compressed(solid('red'), 'rgb', 'png')
    out = [('empty', 'jpeg', b'', 'empty_image'),
           ('garbage', 'jpeg', b'definitely not an image' * 4, 'corrupt_compressed'),
           ('jpeg magic only', 'jpeg', b'\xff\xd8\xff' + bytes(100), 'corrupt_compressed'),
           ('png signature only', 'png', png[:8], 'corrupt_compressed'),
           ('png claimed jpeg', 'jpeg', png, 'format_mismatch'),
           ('jpeg claimed png', 'png', jpg, 'format_mismatch'),
           ('png in "bgr8; jpeg compressed bgr8"', 'bgr8; jpeg compressed bgr8', png, 'format_mismatch'),
           ('png claims 0x0', 'png', png[:16] + bytes(8) + png[24:], 'empty_image')]
    for frac in (0.3, 0.6, 0.9):
        out.append((f'jpeg truncated {frac}', 'jpeg', jpg[:int(len(jpg) * frac)], 'corrupt_compressed'))
        out.append((f'png truncated {frac}', 'png', png[:int(len(png) * frac)], 'corrupt_compressed'))
    bomb = bytearray(png)  # IDAT chunk length -> 3.2 GB (OpenCV would allocate it and spend seconds)
    bomb[33:37] = (0xC2000000).to_bytes(4, 'big')
    out.append(('png chunk length 3 GB', 'png', bytes(bomb), 'corrupt_compressed'))
    out.append(('jpeg without EOI', 'jpeg', jpg[:-2], 'corrupt_compressed'))
    out.append(('png without IEND', 'png', png[:-12], 'corrupt_compressed'))
    return out


@pytest.mark.parametrize('name, fmt, data, reason', compressed_faults(),
                         ids=[f[0] for f in compressed_faults()])
def test_compressed_faults(name, fmt, data, reason):
    with pytest.raises(FrameError) as e:
        decode_compressed(fmt, data)
    assert e.value.reason == reason, (name, e.value)


def test_fuzz_never_raises_anything_but_frame_error(tmp_path):
    """Random geometry/garbage for every supported encoding and random corruptions of JPEG/PNG payloads,
    through the same calls as the node's inference thread: a frame is either classified or a FrameError."""
    from edge_tl_ros.bundle import load_bundle
    from edge_tl_ros.engine import Engine

    eng = Engine(load_bundle(make_toy_bundle(tmp_path / 'toy')))
    rng = np.random.default_rng(0)
    ok = bad = 0
    for i in range(600):
        enc = SUPPORTED_ENCODINGS[i % len(SUPPORTED_ENCODINGS)]
        h, w = (int(v) for v in rng.integers(0, 40, 2))
        step = int(rng.integers(0, 200))
        data = rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
        try:
            img, order = image_view(enc, h, w, step, int(rng.integers(0, 2)), data)
            eng.infer(img, order, None if i % 3 else (int(rng.integers(0, 50)), int(rng.integers(0, 50)),
                                                      int(rng.integers(0, 50)), int(rng.integers(0, 50))))
            ok += 1
        except FrameError:
            bad += 1
    base = [encode_compressed(solid(c, 20, 20), 'rgb', f) for c in COLOURS for f in ('jpeg', 'png')]
    for i in range(300):
        b = bytearray(base[i % len(base)])
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        if i % 4 == 0:
            del b[int(rng.integers(1, len(b))):]
        try:
            # max_pixels small: a flipped size field within the limit is decoded (slow at 16 MP)
            img, order = decode_compressed(('jpeg', 'png')[i % 2], bytes(b), max_pixels=64 * 64)
            eng.infer(img, order)
            ok += 1
        except FrameError:
            bad += 1
    assert ok > 50 and bad > 300  # both outcomes were exercised; nothing else was raised


# -- the nodes over real DDS -------------------------------------------------------------------------------
rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from test_perception_node import Harness  # noqa: E402
from vision_msgs.msg import Classification, ObjectHypothesis  # noqa: E402


def wait_for(cond, timeout, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def bad_messages():
    """(message, reason) for every fault the perception node must reject."""
    out = [(Image(height=4, width=4, encoding=e, step=64, data=bytes(256)), 'unsupported_encoding')
           for e in UNSUPPORTED]
    out += [
        (Image(height=0, width=0, encoding='rgb8', step=0, data=b''), 'empty_image'),
        (Image(height=4, width=4, encoding='rgb8', step=8, data=bytes(64)), 'bad_step'),
        (Image(height=4, width=4, encoding='mono16', step=9, data=bytes(64)), 'bad_step'),
        (Image(height=4, width=4, encoding='rgb8', step=20, data=bytes(48)), 'short_data'),
        (Image(height=4, width=4, encoding='rgb8', step=12, data=bytes(20)), 'short_data'),
        (Image(height=2, width=2, encoding='mono16', is_bigendian=1, step=4, data=bytes(7)), 'short_data'),
        # the claim alone is enough to refuse: no 192 MB over DDS for this one
        (Image(height=8000, width=8000, encoding='rgb8', step=24000, data=bytes(64)), 'too_large'),
    ]
    for _, fmt, data, reason in compressed_faults():
        out.append((CompressedImage(format=fmt, data=data), reason))
    return out


def test_perception_rejects_each_bad_frame_counts_it_and_keeps_serving(ros_context, tmp_path, capfd):
    toy = make_toy_bundle(tmp_path / 'toy')
    h = Harness(ros_context, toy, tmp_path / 'state', use_compressed=True, qos_depth=100,
                diagnostics_period_s=0.2)
    diag = []
    h.io.create_subscription(DiagnosticArray, '/diagnostics', diag.append, 50)
    t0 = time.monotonic()
    try:
        bad = bad_messages()
        expect = {}
        colours = list(COLOURS)
        for k, (msg, reason) in enumerate(bad):
            msg.header.stamp.sec = h.next_stamp()
            (h.pub_c if isinstance(msg, CompressedImage) else h.pub).publish(msg)
            expect[reason] = expect.get(reason, 0) + 1
            assert wait_for(lambda: h.node.rejected == k + 1, 5), (k, reason, h.node.stats())
            if k % 4 == 0 or isinstance(msg, CompressedImage):  # the next valid frame is served
                name = colours[k % 3]
                assert h.classify(name, ('rgb8', 'bgr8')[k % 2]) == name
        s = h.node.stats()
        assert s['reject_reasons'] == expect and s['rejected'] == len(bad)
        assert s['dropped'] == 0 and 'inference_error' not in s['reject_reasons']
        # the same numbers over DDS, per reason, in the perception node's /diagnostics status
        def diag_kv():
            for arr in reversed(diag):
                for st in arr.status:
                    if 'perception' in st.name:
                        return {kv.key: kv.value for kv in st.values}
            return {}
        assert wait_for(lambda: diag_kv().get('rejected_frames') == str(len(bad)), 5), diag_kv()
        kv = diag_kv()
        assert {k[len('rejected.'):]: int(v) for k, v in kv.items() if k.startswith('rejected.')} == expect
        # a real 8000x8000 mono8 frame (64 MB) through DDS: refused, and the node goes on
        big = Image(height=8000, width=8000, encoding='mono8', step=8000, data=bytes(64_000_000))
        big.header.stamp.sec = h.next_stamp()
        h.pub.publish(big)
        del big
        assert wait_for(lambda: h.node.reject_reasons['too_large'] == 2, 20), h.node.stats()
        # max_image_pixels is a run-time limit: lowered, a 100x100 frame is refused; raised, accepted
        assert h.node.set_parameters([Parameter('max_image_pixels', value=5000)])[0].successful
        r = h.send(h.image_msg(solid('green', 100, 100)), timeout=1.0)
        assert r is None and h.node.reject_reasons['too_large'] == 3
        assert h.node.set_parameters([Parameter('max_image_pixels', value=10**6)])[0].successful
        assert h.send(h.image_msg(solid('green', 100, 100))).results[0].class_id == 'green'
    finally:
        h.close()
    # logged, but throttled (one line per 5 s): ~75 rejections give a few warning lines, not 75
    elapsed = time.monotonic() - t0
    lines = [ln for ln in capfd.readouterr().err.splitlines() if 'dropping frame' in ln]
    assert 1 <= len(lines) <= 1 + int(elapsed / 5), (elapsed, lines)


def test_adaptation_node_counts_bad_frames_and_loses_no_label(ros_context, tmp_path):
    from test_adaptation_node import IO, make_node, spin

    toy = make_toy_bundle(tmp_path / 'toy')
    node = make_node(ros_context, toy, tmp_path / 'state')
    io = IO(ros_context)
    ex, _ = spin(ros_context, node, io.node)
    try:
        assert wait_for(lambda: io.pub_img.get_subscription_count() and io.pub_lab.get_subscription_count(),
                        10)
        raw = [(m, r) for m, r in bad_messages() if isinstance(m, Image)]
        raw.append((Image(height=2, width=2, encoding='mono16', step=8,
                          data=np.full(6, 40000, '<u2').tobytes()), None))  # valid: last row unpadded
        good_stamps = []

        def deliver(img_msg, done):
            # the node's image subscription is sensor-data QoS (best effort, depth 5): on a busy machine a
            # frame can be lost before the node sees it; send it again (same stamp) until it is handled
            for _ in range(5):
                io.pub_img.publish(img_msg)
                if wait_for(done, 2):
                    return
            raise AssertionError(f'frame {img_msg.header.stamp.sec} never handled: {node.collector.counters}')

        for k, (msg, reason) in enumerate(raw):
            # a labelled bad frame, then a labelled good frame: the good one's label must land
            msg.header.stamp.sec, msg.header.stamp.nanosec = 50_000 + k, 0
            io.pub_lab.publish(Classification(header=msg.header,
                                              results=[ObjectHypothesis(class_id='red', score=1.0)]))
            n_bad = node.collector.counters['frames_bad']
            n_topic = node.store.label_counts()['topic']
            deliver(msg, (lambda n=n_bad: node.collector.counters['frames_bad'] == n + 1) if reason else
                    (lambda n=n_topic: node.store.label_counts()['topic'] == n + 1))
            k_cls = k % 3
            good = Image(**image_fields(solid(TOY_CLASSES[k_cls], 16, 16), 'rgb8'))
            good.header.stamp.sec, good.header.stamp.nanosec = 60_000 + k, 0
            io.pub_lab.publish(Classification(header=good.header, results=[
                ObjectHypothesis(class_id=TOY_CLASSES[k_cls], score=1.0)]))
            n_topic = node.store.label_counts()['topic']
            deliver(good, lambda n=n_topic: node.store.label_counts()['topic'] == n + 1)
            good_stamps.append(((60_000 + k, 0), TOY_CLASSES[k_cls]))
        # malformed labels are counted too
        io.pub_lab.publish(Classification())
        io.pub_lab.publish(Classification(results=[ObjectHypothesis(class_id='', score=1.0)]))
        n_bad = sum(1 for _, r in raw if r)
        assert wait_for(lambda: node.collector.counters['frames_bad'] == n_bad
                        and node.collector.counters['labels_bad'] == 2
                        and node.store.label_counts()['topic'] == len(raw) + 1, 20), \
            (node.status()['counters'], node.status()['bad_frames'], n_bad, len(raw))
        s = node.status()
        want = {}
        for _, r in raw:
            if r:
                want[r] = want.get(r, 0) + 1
        assert s['bad_frames'] == want and s['labels_dropped'] == 0
        lab = node.store.labelled()
        got = dict(zip(lab.stamps.tolist(), lab.labels))
        for (sec, nsec), name in good_stamps:
            assert got[sec * 10**9 + nsec] == name
        assert got[(50_000 + len(raw) - 1) * 10**9] == 'red'  # the unpadded mono16 frame was stored
        assert not any((50_000 + k) * 10**9 in got for k, (_, r) in enumerate(raw) if r)
    finally:
        ex.shutdown()
        node.destroy_node()
        io.node.destroy_node()
