"""Seeded, bounded fuzzing of the perception node's boundaries.

- ``imaging`` as plain Python: absurd argument values give ``FrameError``, never another exception.
"""

import numpy as np

from edge_tl_ros.imaging import (SUPPORTED_ENCODINGS, FrameError, decode_compressed, encode_compressed,
                                 image_view)

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
