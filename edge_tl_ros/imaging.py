"""sensor_msgs image payloads <-> numpy, without ROS imports and without copying where possible.

``image_view`` turns the fields of a sensor_msgs/Image into an ``HxWxC`` uint8 *view* of the message
buffer (``np.frombuffer`` + strides, honouring ``step`` padding): no per-pixel Python, no copy for the
8-bit encodings. ``decode_compressed`` decodes a sensor_msgs/CompressedImage payload with OpenCV.
Every rejection raises :class:`FrameError` whose ``reason`` is a short, stable key that the nodes count
in their diagnostics. Both are plain Python functions: any argument values (negative or huge ints,
non-integers, objects without a byte buffer) give a ``FrameError``, never another exception.
"""

from __future__ import annotations

import operator
import struct

import cv2
import numpy as np

# encoding -> (channels, dtype, channel order of the result)
ENCODINGS = {
    'rgb8': (3, np.uint8, 'rgb'),
    'bgr8': (3, np.uint8, 'bgr'),
    'rgba8': (4, np.uint8, 'rgba'),
    'bgra8': (4, np.uint8, 'bgra'),
    'mono8': (1, np.uint8, 'mono'),
    '8UC1': (1, np.uint8, 'mono'),
    '8UC3': (3, np.uint8, 'bgr'),  # OpenCV convention
    'mono16': (1, np.uint16, 'mono'),
    '16UC1': (1, np.uint16, 'mono'),
    'rgb16': (3, np.uint16, 'rgb'),
    'bgr16': (3, np.uint16, 'bgr'),
}
SUPPORTED_ENCODINGS = tuple(ENCODINGS)

DEFAULT_MAX_PIXELS = 4096 * 4096


class FrameError(ValueError):
    """A frame that cannot be used; ``reason`` is a short key for diagnostics counters."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f'{reason}: {detail}')
        self.reason = reason
        self.detail = detail


def image_view(encoding: str, height: int, width: int, step: int, is_bigendian: int | bool, data,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Return ``(array, order)``: an ``HxWxC`` view on ``data`` and its channel order.

    ``order`` is one of ``rgb``, ``bgr``, ``rgba``, ``bgra``, ``mono``. 16-bit encodings are scaled to
    8 bits (this one allocates). ``data`` is anything exposing the buffer protocol (the message's
    ``array.array``, ``bytes``, ``memoryview``).
    """
    spec = ENCODINGS.get(encoding) if isinstance(encoding, str) else None
    if spec is None:
        raise FrameError('unsupported_encoding',
                         f'encoding {str(encoding)[:64]!r} is not supported '
                         f'(use one of {", ".join(SUPPORTED_ENCODINGS)})')
    channels, dtype, order = spec
    try:  # ROS gives uint32; a plain-Python caller may give anything
        height, width, step = operator.index(height), operator.index(width), operator.index(step)
    except TypeError:
        raise FrameError('bad_geometry', f'height/width/step must be integers, got '
                                         f'{type(height).__name__}/{type(width).__name__}/'
                                         f'{type(step).__name__}') from None
    if height <= 0 or width <= 0:
        raise FrameError('empty_image', f'image is {width}x{height}')
    if height * width > max_pixels:
        raise FrameError('too_large', f'image is {width}x{height}, more than max_pixels={max_pixels}')
    itemsize = np.dtype(dtype).itemsize
    row_bytes = width * channels * itemsize
    if step < row_bytes:
        raise FrameError('bad_step', f'step {step} < width*channels*bytes = {row_bytes}')
    buf = _byte_buffer(data)
    need = (height - 1) * step + row_bytes
    if len(buf) < need:
        raise FrameError('short_data', f'data has {len(buf)} bytes, {width}x{height} with step {step} '
                                       f'needs {need}')
    # here need <= len(buf), so (height - 1) * step fits in a C ssize_t; a single row's step is never
    # used to address memory (it may be any size, e.g. 2**64, in a plain-Python call)
    row_stride = step if height > 1 else row_bytes
    if itemsize == 1:
        flat = np.frombuffer(buf, dtype=np.uint8, count=need)
        arr = np.lib.stride_tricks.as_strided(flat, shape=(height, width, channels),
                                              strides=(row_stride, channels, 1), writeable=False)
        return arr, order
    if step % itemsize:
        raise FrameError('bad_step', f'step {step} is not a multiple of {itemsize} for {encoding}')
    dt = np.dtype(dtype).newbyteorder('>' if is_bigendian else '<')
    # a strided view like the 8-bit case: the last row needs no padding (len(buf) >= need suffices)
    arr = np.ndarray((height, width, channels), dtype=dt, buffer=buf, offset=0,
                     strides=(row_stride, channels * itemsize, itemsize))
    return (arr >> 8).astype(np.uint8), order


def _byte_buffer(data):
    """``data`` as a flat uint8 buffer without copying (ROS gives ``array.array('B')``), or FrameError."""
    try:
        if isinstance(data, np.ndarray):
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        return memoryview(data).cast('B')
    except (TypeError, ValueError) as e:  # no buffer protocol (None, str, list), object arrays, ...
        raise FrameError('bad_data', f'data is not a byte buffer ({type(data).__name__}: {e})') from None


_MAGIC = {'jpeg': (b'\xff\xd8\xff',), 'png': (b'\x89PNG\r\n\x1a\n',)}


def sniff_format(data) -> str | None:
    head = bytes(memoryview(data)[:8])
    for fmt, magics in _MAGIC.items():
        if any(head.startswith(m) for m in magics):
            return fmt
    return None


def claimed_format(fmt: str) -> str | None:
    """The codec named by a CompressedImage ``format`` string (``jpeg``, ``png``, ``bgr8; jpeg compressed
    bgr8``, ...), or None if it names neither."""
    f = fmt.lower()
    if 'png' in f:
        return 'png'
    if 'jpeg' in f or 'jpg' in f:
        return 'jpeg'
    return None


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)


def compressed_size(fmt: str, data) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG/PNG header without decoding, or None if the header is unreadable."""
    b = memoryview(data).cast('B')
    n = len(b)
    if fmt == 'png':  # signature, then the IHDR chunk: length, 'IHDR', width, height (big-endian)
        if n < 24 or bytes(b[12:16]) != b'IHDR':
            return None
        return int.from_bytes(b[20:24], 'big'), int.from_bytes(b[16:20], 'big')
    i = 2  # JPEG: walk the marker segments after SOI up to the first start-of-frame
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:  # markers without a length
            i += 2
            continue
        if m in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        seg = (b[i + 2] << 8) | b[i + 3]
        if m in _JPEG_SOF:
            if i + 9 > n or seg < 7:
                return None
            return (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
        if seg < 2:
            return None
        i += 2 + seg
    return None


_CHUNK = struct.Struct('>I4s')  # PNG chunk: length, type


def _complete(fmt: str, data) -> bool:
    """A JPEG ends with EOI (trailing zero padding allowed); a PNG is a chain of chunks that each fit in
    the payload, ending with IEND. (A corrupt chunk length makes OpenCV allocate up to 4 GB and spend
    seconds on a 128-byte payload: checked here, before the decoder sees it.)"""
    b = memoryview(data).cast('B')
    if fmt == 'png':
        n, pos, unpack = len(b), 8, _CHUNK.unpack_from
        while pos + 12 <= n:
            length, kind = unpack(b, pos)
            pos += 12 + length
            if pos > n:
                return False
            if kind == b'IEND':
                return True
        return False
    return bytes(b[-64:]).rstrip(b'\x00').endswith(b'\xff\xd9')


def decode_compressed(fmt: str, data, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Decode a CompressedImage payload to ``(HxWx3 uint8 BGR array, 'bgr')``.

    The size in the JPEG/PNG header is checked against ``max_pixels`` *before* decoding (a small
    payload can claim a huge image), and truncated payloads are refused without calling the decoder.
    """
    data = _byte_buffer(data)
    if len(data) == 0:
        raise FrameError('empty_image', 'compressed image has no data')
    fmt = fmt if isinstance(fmt, str) else ''
    actual = sniff_format(data)
    claimed = claimed_format(fmt)
    if actual is None:
        raise FrameError('corrupt_compressed', f'payload is neither JPEG nor PNG (format {fmt!r})')
    if claimed is not None and claimed != actual:
        raise FrameError('format_mismatch', f'format says {claimed!r} but the payload is {actual}')
    size = compressed_size(actual, data)
    if size is None:
        raise FrameError('corrupt_compressed', f'{actual} header is unreadable (no image size)')
    if size[0] * size[1] == 0:
        raise FrameError('empty_image', f'{actual} header says {size[1]}x{size[0]}')
    if size[0] * size[1] > max_pixels:
        raise FrameError('too_large', f'{actual} header says {size[1]}x{size[0]}, more than '
                                      f'max_pixels={max_pixels}')
    if not _complete(actual, data):
        raise FrameError('corrupt_compressed', f'{actual} payload is truncated or its structure is corrupt')
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise FrameError('corrupt_compressed', f'OpenCV refused the {actual} payload: '
                                               f'{str(e).strip().splitlines()[-1][:120]}') from None
    if img is None or img.size == 0:
        raise FrameError('corrupt_compressed', f'OpenCV could not decode the {actual} payload')
    if img.shape[0] * img.shape[1] > max_pixels:
        raise FrameError('too_large', f'decoded image is {img.shape[1]}x{img.shape[0]}')
    return img, 'bgr'


def is_compressed(msg) -> bool:
    """Whether ``msg`` is a sensor_msgs/CompressedImage (duck-typed: ``format``, no ``encoding``)."""
    return hasattr(msg, 'format') and not hasattr(msg, 'encoding')


def decode_message(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """THE camera-message decoder of both nodes: a sensor_msgs/Image (zero-copy view, :func:`image_view`)
    or CompressedImage (:func:`decode_compressed`) -> ``(HxWx3 uint8 array, colour order)``."""
    if is_compressed(msg):
        return decode_compressed(msg.format, msg.data, max_pixels)
    return image_view(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data, max_pixels)


def encode_compressed(rgb_or_bgr: np.ndarray, order: str = 'bgr', fmt: str = 'jpeg',
                      quality: int = 90) -> bytes:
    """Encode an ``HxWx3`` uint8 image as JPEG or PNG bytes (for bags and tests)."""
    img = rgb_or_bgr if order == 'bgr' else cv2.cvtColor(rgb_or_bgr, cv2.COLOR_RGB2BGR)
    if fmt == 'jpeg':
        ok, enc = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif fmt == 'png':
        ok, enc = cv2.imencode('.png', img)
    else:
        raise ValueError(f'unknown compressed format {fmt!r}')
    if not ok:
        raise ValueError('OpenCV failed to encode the image')
    return enc.tobytes()


def resize_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize ``img`` to ``h x w`` the one way training and inference share.

    Area averaging when shrinking (no aliasing), bilinear when enlarging (area interpolation would
    replicate pixels). Returns ``img`` itself when it already has the size.
    """
    if img.shape[0] == h and img.shape[1] == w:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > h or img.shape[1] > w else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=interp)


def downscale(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """A frame of any size (HxW[xC] uint8, a view on a message is fine) to ``h x w``: a strided view first
    (no copy; still >= 2x2 samples per output pixel), then :func:`resize_to`. INTER_AREA on a non-integer
    scale from a large frame costs ms (15 ms from 1080p to 32x32); the stride brings it to ~0.2 ms.
    HxWx1 becomes HxW. What inference (``Engine.preprocess``) and the adaptation node's crops use."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    s = min(img.shape[0] // (2 * h), img.shape[1] // (2 * w))
    if s > 1:
        img = img[::s, ::s]
    return resize_to(img, h, w)


def to_order(img: np.ndarray, order: str, want: str) -> np.ndarray:
    """Convert a (small) ``HxWxC`` uint8 image from ``order`` to ``want`` (``rgb`` or ``bgr``)."""
    if order == want:
        return img
    codes = {
        ('bgr', 'rgb'): cv2.COLOR_BGR2RGB, ('rgb', 'bgr'): cv2.COLOR_RGB2BGR,
        ('rgba', 'rgb'): cv2.COLOR_RGBA2RGB, ('rgba', 'bgr'): cv2.COLOR_RGBA2BGR,
        ('bgra', 'rgb'): cv2.COLOR_BGRA2RGB, ('bgra', 'bgr'): cv2.COLOR_BGRA2BGR,
        ('mono', 'rgb'): cv2.COLOR_GRAY2RGB, ('mono', 'bgr'): cv2.COLOR_GRAY2BGR,
    }
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(img), codes[(order, want)])


def image_fields(img: np.ndarray, encoding: str = 'bgr8') -> dict:
    """Fields of a sensor_msgs/Image holding ``img`` (HxWxC or HxW uint8), for publishers and bags."""
    img = np.ascontiguousarray(img)
    h, w = img.shape[:2]
    c = 1 if img.ndim == 2 else img.shape[2]
    if ENCODINGS.get(encoding, (None,))[0] != c:
        raise ValueError(f'{encoding} needs {ENCODINGS.get(encoding, ("?",))[0]} channels, image has {c}')
    return {'height': h, 'width': w, 'encoding': encoding, 'is_bigendian': 0, 'step': w * c * img.itemsize,
            'data': img.tobytes()}
