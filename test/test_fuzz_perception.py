"""Seeded, bounded fuzzing of the perception node's boundaries, with a real node over real DDS.

- the message boundary: random malformed ``sensor_msgs/Image`` (unknown encodings, 0 / huge geometry,
  short and long data, big-endian flags) and ``CompressedImage`` (garbage, truncated or bit-flipped
  JPEG/PNG, wrong format strings) interleaved with good frames: every message the node receives is
  classified, rejected with a frame reason, or dropped by the newest-frame policy; nothing else;
- the head-registry boundary: random ``index.json`` values and head npz files behind ``~/reload_head``,
  ``~/rollback`` and ``head_version``: always an answer, never a dead node or a lost head;
- ``imaging`` as plain Python: absurd argument values give ``FrameError``, never another exception.

Each test is a fixed number of iterations (a few seconds on 2 busy cores).
"""

import hashlib
import json
import time

import numpy as np
import pytest

from edge_tl_ros.imaging import (SUPPORTED_ENCODINGS, FrameError, decode_compressed, encode_compressed,
                                 image_view)
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle

# every reason a frame may be rejected with at the message boundary (not inference_error/publish_error)
FRAME_REASONS = {'unsupported_encoding', 'empty_image', 'too_large', 'bad_step', 'short_data', 'bad_geometry',
                 'bad_data', 'corrupt_compressed', 'format_mismatch', 'non_finite'}


def pick(rng, options):
    return options[int(rng.integers(0, len(options)))]


def _solid(rgb, h=20, w=20):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rgb
    return img


# -- imaging as plain Python -------------------------------------------------------------------------------
def _absurd_int(rng):
    return pick(rng, [0, 1, -1, 2, 3, 7, -2**31, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, 2**80,
                      -2**80, int(rng.integers(1, 64)), 1.5, float('nan'), float('inf'), -0.0, True, None,
                      '4', np.uint32(2**32 - 1), np.int64(-5), np.float32(2)])


def _absurd_data(rng):
    k = int(rng.integers(0, 9))
    n = int(rng.integers(0, 600))
    return [bytes(n), bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes()),
            memoryview(bytes(n)), np.zeros(n, np.uint8), np.zeros((2, 3), np.float64),
            np.zeros(3, object), None, 'pixels', [0] * n][k]


def test_imaging_absurd_arguments_give_only_frame_errors():
    rng = np.random.default_rng(7)
    ok = bad = 0
    encodings = list(SUPPORTED_ENCODINGS) + ['', 'RGB8', 'rgb8 ', 'yuv422', None, 3, ['rgb8']]
    for _ in range(3000):
        h, w, step = _absurd_int(rng), _absurd_int(rng), _absurd_int(rng)
        enc = encodings[int(rng.integers(0, len(encodings)))]
        try:
            img, order = image_view(enc, h, w, step, int(rng.integers(0, 256)), _absurd_data(rng),
                                    max_pixels=int(rng.integers(1, 10**7)))
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[:2] == (h, w)
            ok += 1
        except FrameError as e:
            assert e.reason in FRAME_REASONS, e
            bad += 1
    jpg = encode_compressed(_solid((200, 10, 10)), 'rgb', 'jpeg')
    png = encode_compressed(_solid((10, 200, 10)), 'rgb', 'png')
    formats = ['jpeg', 'png', 'JPEG', 'bgr8; jpeg compressed bgr8', '', 'tiff', None, b'jpeg', 7]
    for _ in range(1000):
        base = (jpg, png)[int(rng.integers(0, 2))]
        k = int(rng.integers(0, 6))
        data = [base, base[:int(rng.integers(0, len(base)))], _absurd_data(rng),
                base[:3] + bytes(int(rng.integers(0, 200))), np.frombuffer(base, np.uint8),
                bytes(base[:20]) + b'\x00' * 10][k]
        try:
            img, order = decode_compressed(formats[int(rng.integers(0, len(formats)))], data,
                                           max_pixels=int(rng.integers(1, 10**6)))
            assert img.ndim == 3 and order == 'bgr'
            ok += 1
        except FrameError as e:
            assert e.reason in FRAME_REASONS, e
            bad += 1
    assert ok > 50 and bad > 1000


# -- the nodes over real DDS -------------------------------------------------------------------------------
rclpy = pytest.importorskip('rclpy')
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from test_perception_node import COLOURS, Harness, frame, wait_for  # noqa: E402

from edge_tl_ros.bundle import HeadRegistry, load_bundle  # noqa: E402
from edge_tl_ros.toy import toy_head  # noqa: E402

U32 = 2**32 - 1
MAX_DATA = 200_000  # bytes of payload per fuzzed message (the claims in the header may be anything)


def _random_string(rng, n):
    alphabet = 'abcdefghijklmnopqrstuvwxyzRGB0123456789_; /\u00e9\u4e2d'
    return ''.join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), n))


def random_image(rng) -> Image:
    """A sensor_msgs/Image with fields drawn from the edges of their ranges (most of them malformed)."""
    known = list(SUPPORTED_ENCODINGS)
    r = rng.random()
    enc = (pick(rng, known) if r < 0.6 else
           pick(rng, ['', '32FC1', 'bayer_rggb8', 'RGB8', 'rgb8 ', 'nv12']) if r < 0.8 else
           _random_string(rng, int(rng.integers(1, 300))))

    def dim():
        return pick(rng, [0, 1, 2, int(rng.integers(1, 48)), int(rng.integers(1, 48)), 2**16, 2**31, U32,
                          int(rng.integers(0, U32))])

    h, w = dim(), dim()
    channels = {'mono8': 1, '8UC1': 1, 'mono16': 2, '16UC1': 2, 'rgb16': 6, 'bgr16': 6, 'rgba8': 4,
                'bgra8': 4}.get(enc, 3)
    row = w * channels
    step = pick(rng, [0, row, row + int(rng.integers(1, 9)), max(0, row - 1), int(rng.integers(0, 4096)),
                      U32, row * 2])
    step = min(step, U32)
    need = max(0, (h - 1) * step + row) if h and w else 0
    n = pick(rng, [0, need - 1, need, need + int(rng.integers(1, 100)), int(rng.integers(0, 5000))])
    n = int(min(max(n, 0), MAX_DATA))
    return Image(height=h, width=w, encoding=enc, step=step, is_bigendian=int(rng.integers(0, 256)),
                 data=rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def random_compressed(rng, good) -> CompressedImage:
    base = good[int(rng.integers(0, len(good)))]
    b = bytearray(base)
    k = int(rng.integers(0, 7))
    if k == 0:  # garbage
        b = bytearray(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
    elif k == 1:  # truncated
        del b[int(rng.integers(0, len(b))):]
    elif k in (2, 3):  # bit flips (header or anywhere)
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(0, min(len(b), 40 if k == 2 else len(b))))] ^= 1 << int(rng.integers(0, 8))
    elif k == 4:  # a magic number and junk
        b = bytearray((b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n')[int(rng.integers(0, 2))]
                      + rng.integers(0, 256, int(rng.integers(0, 500)), dtype=np.uint8).tobytes())
    elif k == 5:  # a PNG claiming a huge image / a JPEG with its SOF size set to 65535x65535
        if base[:4] == b'\x89PNG':
            b[16:24] = (65535 * 3).to_bytes(4, 'big') + (40000).to_bytes(4, 'big')
        else:
            i = bytes(b).find(b'\xff\xc0')
            if i > 0:
                b[i + 5:i + 9] = b'\xff\xff\xff\xff'
    fmt = pick(rng, ['jpeg', 'png', 'JPEG', 'bgr8; jpeg compressed bgr8', 'rgb8; png compressed', '', 'tiff',
                     _random_string(rng, int(rng.integers(1, 40)))])
    return CompressedImage(format=fmt, data=bytes(b))


@pytest.fixture
def toy(tmp_path):
    return make_toy_bundle(tmp_path / 'toy')


def test_fuzz_image_messages_every_one_accounted(ros_context, toy, tmp_path):
    h = Harness(ros_context, toy, tmp_path / 'state', use_compressed=True, qos_depth=100,
                max_image_pixels=1_000_000, diagnostics_period_s=0.5)
    rng = np.random.default_rng(20240611)
    good = [encode_compressed(_solid(c), 'rgb', f) for c in COLOURS.values() for f in ('jpeg', 'png')]
    node = h.node
    names = list(COLOURS)
    sent = 0
    try:
        for i in range(400):
            if i % 25 == 24:  # a good frame, classified correctly, between the bad ones
                name = names[i % 3]
                if i % 2:
                    msg = CompressedImage(format='jpeg', data=encode_compressed(frame(name), 'rgb', 'jpeg'))
                    msg.header.stamp.sec = h.next_stamp()
                    r = h.send(msg)
                    assert r is not None and r.results[0].class_id == name, i
                else:
                    assert h.classify(name, ('rgb8', 'bgr8')[i % 4 // 2]) == name, i
                sent += 1
                continue
            msg = random_image(rng) if rng.random() < 0.6 else random_compressed(rng, good)
            msg.header.stamp.sec = h.next_stamp()
            (h.pub_c if isinstance(msg, CompressedImage) else h.pub).publish(msg)
            sent += 1
            # reliable QoS, and the next message only once this one arrived: none is lost before the node
            assert wait_for(lambda: node.received == sent, 10), (i, sent, node.stats())
        # every message received is accounted for: classified, rejected with a frame reason, or dropped
        assert wait_for(lambda: not node._slot and node.processed + node.rejected + node.dropped == sent
                        and len(h.results) == node.processed, 10), node.stats()
        s = node.stats()
        print('fuzzed messages:', {k: s[k] for k in ('received', 'processed', 'rejected', 'dropped')},
              s['reject_reasons'])
        assert s['received'] == sent and s['processed'] + s['rejected'] + s['dropped'] == sent, s
        assert set(s['reject_reasons']) <= FRAME_REASONS, s['reject_reasons']
        assert s['rejected'] > 200 and s['processed'] > 16, s
        assert s['inference_restarts'] == 0 and s['publish_errors'] == 0 and node._worker.is_alive()
        assert all(r.results and r.results[0].class_id in TOY_CLASSES for r in h.results)
        assert h.classify('blue') == 'blue'
    finally:
        h.close()


# -- the head registry boundary ----------------------------------------------------------------------------
def _random_json(rng, depth=0):
    k = int(rng.integers(0, 9 if depth < 3 else 6))
    if k == 0:
        return None
    if k == 1:
        return bool(rng.integers(0, 2))
    if k == 2:
        return pick(rng, [0, 1, 2, -1, 10**30, -2**63, 1_000_001])
    if k == 3:
        return pick(rng, [0.5, 1e308, -0.0, 2.0])
    if k in (4, 5):
        return pick(rng, ['', '1', 'head_v1.npz', '../../etc/passwd', 'x' * 500])
    if k == 6:
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    keys = ['current', 'accepted', 'versions', 'file', 'sha256', '1', '2', '']
    return {pick(rng, keys): _random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def random_index(rng, good: dict) -> bytes:
    """An index.json: the good one with random values swapped in, random JSON, or mangled text."""
    k = int(rng.integers(0, 6))
    if k <= 1:
        idx = json.loads(json.dumps(good))
        for _ in range(int(rng.integers(1, 3))):
            key = pick(rng, ['current', 'accepted', 'versions'])
            idx[key] = _random_json(rng)
        text = json.dumps(idx)
    elif k == 2:
        text = json.dumps(_random_json(rng))
    elif k == 3:  # numbers JSON allows but no int holds, and a deep nesting
        text = pick(rng, ['{"current": 1e400, "accepted": [0, 1], "versions": {}}',
                          '{"current": NaN, "accepted": [0], "versions": {}}',
                          '{"current": 1, "accepted": [-Infinity], "versions": {}}',
                          '[' * 100_000 + ']' * 100_000,
                          '{"a":' * 50_000 + '1' + '}' * 50_000])
    else:  # the good text, cut or with bytes changed
        b = bytearray(json.dumps(good).encode())
        if k == 4:
            del b[int(rng.integers(0, len(b))):]
        else:
            for _ in range(int(rng.integers(1, 6))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        return bytes(b)
    return text.encode()


def random_head_npz(rng) -> bytes:
    from edge_tl_ros.atomic import npz_bytes

    arrays = {'weight': np.asarray(toy_head().weight), 'bias': np.zeros(3, np.float32),
              'class_names': np.array(TOY_CLASSES)}
    k = int(rng.integers(0, 10))
    if k == 0:
        arrays['weight'] = np.array([['w'] * 8] * 3)
    elif k == 1:
        arrays['weight'] = np.zeros(pick(rng, [(), (8,), (3, 7), (0, 8), (4, 8), (3, 8, 1)]))
    elif k == 2:
        arrays['bias'] = np.zeros(int(rng.integers(0, 6)), pick(rng, [np.float32, np.int8, np.bool_]))
    elif k == 3:
        arrays['class_names'] = pick(rng, [np.arange(3), np.array([]), np.array(['a', 'b', 'c']),
                                           np.array(list(TOY_CLASSES) + ['new'])])
    elif k == 4:
        arrays['weight'] = arrays['weight'].astype(pick(rng, [np.float16, np.int32, np.complex64, np.bool_,
                                                              np.uint64]))
    elif k == 5:
        arrays['weight'] = np.full((3, 8), pick(rng, [np.nan, np.inf, 3e38]), np.float32)
    elif k == 6:
        del arrays[pick(rng, ['weight', 'bias', 'class_names'])]
    elif k == 7:
        arrays['version'] = np.array(['two'])
    data = npz_bytes(**arrays)
    if k == 8:
        return data[:int(rng.integers(0, len(data)))]
    if k == 9:
        b = bytearray(data)
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        return bytes(b)
    return data


def test_fuzz_head_registry_always_answers_and_keeps_a_head(ros_context, toy, tmp_path):
    state = tmp_path / 'state'
    reg = HeadRegistry(load_bundle(toy), state)
    reg.add(toy_head(permute=(2, 0, 1)))  # v1: red frames -> 'green'
    good_index = reg.index_path.read_bytes()
    good = json.loads(good_index)
    good_v1 = (reg.dir / 'head_v1.npz').read_bytes()
    h = Harness(ros_context, toy, state)
    node = h.node
    rng = np.random.default_rng(99)
    outcomes = {'refused': 0, 'loaded': 0}
    try:
        assert node.head_version == 1 and h.classify('red') == 'green'
        for i in range(80):
            if rng.random() < 0.5:
                reg.index_path.write_bytes(random_index(rng, good))
            else:  # a head file behind a well-formed index entry, with or without its sha256
                (reg.dir / 'head_v2.npz').write_bytes(random_head_npz(rng))
                meta = {'file': 'head_v2.npz'}
                if rng.random() < 0.3:
                    meta['sha256'] = hashlib.sha256((reg.dir / 'head_v2.npz').read_bytes()).hexdigest()
                idx = dict(good, current=2, accepted=[0, 1, 2], versions={**good['versions'], '2': meta})
                reg.index_path.write_text(json.dumps(idx))
            before = node.head_version
            r = h.call([h.reload, h.rollback][int(rng.random() < 0.2)])
            assert r is not None, i  # always an answer
            assert isinstance(r.message, str) and '\n' not in r.message and len(r.message) < 700, r.message
            outcomes['loaded' if r.success else 'refused'] += 1
            if not r.success:
                assert f'keeping head v{before}' in r.message and node.head_version == before, (i, r.message)
            res = node.set_parameters([Parameter('head_version', value=int(rng.integers(0, 4)))])[0]
            assert res.successful or res.reason
            assert node._worker.is_alive() and node.engine.head is not None
            if i % 10 == 9:  # the good registry back: the node follows it and classifies with it
                reg.index_path.write_bytes(good_index)
                (reg.dir / 'head_v1.npz').write_bytes(good_v1)
                r = h.call(h.reload)
                assert r.success and node.head_version == 1, r.message
                assert h.classify('red') == 'green', i
        print('head registry fuzz:', outcomes)
        assert outcomes['refused'] > 40, outcomes
        assert node.inference_restarts == 0 and node.reject_reasons == {}
    finally:
        h.close()
    # the files are left as the last iteration made them: a node still starts on them
    h = Harness(ros_context, toy, state)
    try:
        assert h.node.head_version in (0, 1, 2) and h.classify('blue') in TOY_CLASSES
    finally:
        h.close()
    reg.index_path.write_bytes(b'[' * 100_000 + b']' * 100_000)
    t0 = time.monotonic()
    h = Harness(ros_context, toy, state)
    try:
        assert h.node.head_version == 0 and h.classify('red') == 'red'
    finally:
        h.close()
    assert time.monotonic() - t0 < 60
