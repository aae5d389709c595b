"""What the adaptation node keeps of recent frames in memory: small crops, never full frames.

A label (``labels`` topic) may arrive after its frame. The node therefore remembers the last few frames,
but only as much as a label can still claim: the RGB crop the frame store would keep and the image at the
student's input size (so the features computed later are exactly those of the full frame), or, for a
``CompressedImage``, its compressed payload (decoded only if a label claims it). Memory is bounded by
bytes and by count, and entries older than the label wait (``ttl_s``) are dropped, so nothing is held
after the camera stops for longer than a label could use it.

:class:`ByteBoundedQueue` is the hand-over from the subscription callback to the worker thread, bounded
by bytes too (the newest message is always kept). No ROS imports.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import numpy as np

from .imaging import downscale, to_order


@dataclass
class RecentFrame:
    """One remembered frame. Either ``crop``/``small`` (raw images, shrunk at once) or ``payload``
    (compressed, decoded on demand) is set."""

    stamp: int
    t: float  # monotonic arrival time
    generation: int  # the node's wipe generation when it arrived (a wipe invalidates older frames)
    crop: np.ndarray | None = None  # RGB uint8 [crop_h, crop_w, 3]: what the store keeps
    small: np.ndarray | None = None  # the student's input size, colour order ``order``
    order: str = 'rgb'
    payload: bytes | None = None  # CompressedImage data
    fmt: str = ''

    @property
    def nbytes(self) -> int:
        n = 0 if self.payload is None else len(self.payload)
        for a in (self.crop, self.small):
            if a is not None:
                n += a.nbytes
        return n


def shrink(img: np.ndarray, order: str, crop_hw: tuple[int, int],
           input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A decoded frame -> (RGB crop at ``crop_hw``, image at ``input_hw`` in ``order``); copies, so the
    message buffer can be released."""
    crop = to_order(downscale(img, *crop_hw), order, 'rgb')
    small = downscale(img, *input_hw)
    return _owned(crop), _owned(small)


def _owned(a: np.ndarray) -> np.ndarray:
    """``a`` itself if it owns its memory, else a copy (a view would keep the whole message alive)."""
    return a if a.base is None and a.flags.c_contiguous else np.array(a, copy=True, order='C')


class RecentFrames:
    """Frames a late label may still claim, by stamp; bounded by ``max_bytes``, ``max_entries`` and
    ``ttl_s`` (oldest first). Thread-safe."""

    def __init__(self, max_bytes: int, max_entries: int = 64, ttl_s: float = 10.0):
        if max_bytes < 1 or max_entries < 1:
            raise ValueError('RecentFrames needs max_bytes >= 1 and max_entries >= 1')
        self.max_bytes, self.max_entries, self.ttl_s = int(max_bytes), int(max_entries), float(ttl_s)
        self._d: collections.OrderedDict[int, RecentFrame] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0  # dropped for space or count
        self.expired = 0  # dropped for age

    def put(self, frame: RecentFrame) -> None:
        with self._lock:
            old = self._d.pop(frame.stamp, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._d[frame.stamp] = frame
            self._bytes += frame.nbytes
            while len(self._d) > 1 and (len(self._d) > self.max_entries or self._bytes > self.max_bytes):
                _, f = self._d.popitem(last=False)
                self._bytes -= f.nbytes
                self.evicted += 1

    def pop(self, stamp: int) -> RecentFrame | None:
        with self._lock:
            f = self._d.pop(stamp, None)
            if f is not None:
                self._bytes -= f.nbytes
            return f

    def expire(self, now: float | None = None) -> int:
        """Drop frames older than ``ttl_s``; returns how many."""
        now = time.monotonic() if now is None else now
        n = 0
        with self._lock:
            while self._d:
                f = next(iter(self._d.values()))
                if now - f.t <= self.ttl_s:
                    break
                self._d.popitem(last=False)
                self._bytes -= f.nbytes
                n += 1
            self.expired += n
        return n

    def clear(self) -> int:
        with self._lock:
            n = len(self._d)
            self._d.clear()
            self._bytes = 0
            return n

    def __contains__(self, stamp: int) -> bool:
        with self._lock:
            return stamp in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes


def features_from_fields(encoding: str, height: int, width: int, step: int, is_bigendian, data,
                         feature_size: int) -> tuple[np.ndarray | None, str | None]:
    """A perception ``~/features`` message (sensor_msgs/Image ``32FC1``, 1 x D) -> ``(features, None)``,
    or ``(None, reason)`` when it is malformed: wrong encoding or shape, short or long data, NaN/Inf."""
    if encoding != '32FC1':
        return None, 'encoding'
    if height != 1 or width != feature_size:
        return None, 'shape'
    if step != 4 * width or len(data) != 4 * width:
        return None, 'size'
    feats = np.frombuffer(bytes(data), dtype='>f4' if is_bigendian else '<f4').astype(np.float32)
    if not np.isfinite(feats).all():
        return None, 'non_finite'
    return feats, None


class ByteBoundedQueue:
    """FIFO of ``(item, nbytes)`` holding at most ``max_bytes`` (but always the newest item) and
    ``max_items``; the oldest items are dropped first and counted in :attr:`dropped`. Thread-safe."""

    def __init__(self, max_bytes: int, max_items: int = 16):
        self.max_bytes, self.max_items = int(max_bytes), int(max_items)
        self._q: collections.deque = collections.deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, item, nbytes: int) -> None:
        with self._lock:
            self._q.append((item, int(nbytes)))
            self._bytes += int(nbytes)
            while len(self._q) > 1 and (len(self._q) > self.max_items or self._bytes > self.max_bytes):
                _, n = self._q.popleft()
                self._bytes -= n
                self.dropped += 1

    def get(self):
        """The oldest item, or None when empty."""
        with self._lock:
            if not self._q:
                return None
            item, n = self._q.popleft()
            self._bytes -= n
            return item

    def clear(self) -> int:
        with self._lock:
            n = len(self._q)
            self._q.clear()
            self._bytes = 0
            return n

    def __len__(self) -> int:
        with self._lock:
            return len(self._q)

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes
