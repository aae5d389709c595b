"""The adaptation node's data path without ROS: camera frames and labels in, frame-store entries out.

Producer side (subscription callbacks, never block): :meth:`Collector.put_frame` (a sensor_msgs/Image or
CompressedImage, duck-typed), :meth:`Collector.put_label` (stamp + class name), :meth:`Collector.put_features`
(the perception node's ``~/features``). Consumer side: one worker thread (:meth:`Collector.start`):

  frame -> :class:`~edge_tl_ros.recent.ByteBoundedQueue` (newest win) -> decode (zero-copy view) -> shrink to
  the store's RGB crop + the student's input size (the full frame is released here;
  :class:`~edge_tl_ros.recent.RecentFrames` remembers the small copies a late label may still claim) ->
  student :class:`~edge_tl_ros.engine.Engine` (or the perception node's features, by stamp) -> keep it?
  (labelled, or sampled at ``sample_rate_hz`` and chosen by the :class:`~.selection.Selector`) ->
  :class:`~edge_tl_ros.store.FrameStore`.

A label applies to the stored entry with its stamp, or to the remembered frame with that stamp, or waits
``label_pending_s`` for its frame. Everything odd is counted by reason, never raised. :attr:`since_round`
counts new trainable frames; ``on_round_due`` is called when ``every_n_labels`` of them are there.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..bundle import check_class_name
from ..engine import Prediction, softmax
from ..imaging import FrameError, decode_compressed, decode_message, is_compressed
from ..recent import ByteBoundedQueue, RecentFrame, RecentFrames, features_from_fields, shrink
from ..settings import check, setting
from ..store import FrameStore, stamp_to_ns, valid_stamp
from .config import BIG, AdaptConfig
from .selection import POLICIES, Selector

RECENT_FRAMES = 64  # frames remembered (as small crops) for labels that arrive after their frame
MAX_PENDING_LABELS = 512
FRAME_QUEUE_ITEMS = 16  # messages between the callback and the worker (also bounded by bytes)
FEATURES_WAIT_S = 0.25  # the perception node's features trail the frame by one inference
WARN_EVERY_S = 5.0  # the same warning is logged at most this often


@dataclass
class CollectorConfig:
    """What is kept, how much, and when a round is due (adaptation-node parameters)."""

    max_entries: int = setting(2000, 'store.max_entries',
                               'Frame store: maximum number of entries (oldest evicted).', (1, BIG))
    max_bytes: int = setting(256 << 20, 'store.max_bytes',
                             'Frame store: maximum bytes on disk (oldest evicted).', (4096, 1 << 50))
    max_age_s: float = setting(7 * 86400.0, 'store.max_age_s',
                               'Frame store: entries older than this are evicted (0 = no age limit).',
                               (0.0, 1e10))
    # 5 Hz x keep_fraction 0.5 = 2.5 stored frames/s of a 30 fps camera: the 500 frames bench.adaptation
    # measures with after ~3.5 min of driving, the store's 2000 after ~13 min; a teacher-only drive gets its
    # first round (every_n_labels trainable frames) after ~40 s
    sample_rate_hz: float = setting(5.0, 'store.sample_rate_hz',
                                    'Unlabelled frames evaluated for selection per second (0 = labelled '
                                    'frames only).', (0.0, 1000.0))
    keep_fraction: float = setting(0.5, 'store.keep_fraction',
                                   'Average fraction of sampled unlabelled frames stored.', (0.0, 1.0))
    every_n_labels: int = setting(100, 'round.every_n_labels',
                                  'Start a round after this many new trainable frames (0 = off).',
                                  (0, BIG))
    selection: str = setting('informative', 'advanced.selection',
                             'Which sampled frames to keep: informative prefers low student confidence, '
                             'uniform keeps at random.', choices=POLICIES)
    label_pending_s: float = setting(10.0, 'advanced.label_pending_s',
                                     'How long a label waits for its frame (and a frame for its label).',
                                     (0.1, 3600.0))
    memory_max_bytes: int = setting(64 << 20, 'advanced.memory_max_bytes',
                                    'Camera data held in memory: queued messages plus recent crops (oldest '
                                    'dropped first).', (1 << 20, 1 << 40), read_only=True)
    crop_size: int = setting(64, 'advanced.crop_size',
                             'Side length (pixels) of the RGB crops kept in the store.', (8, 1024),
                             read_only=True)

    def validate(self) -> None:
        check(self)


class Collector:
    """Frames and labels -> store entries, on one worker thread; thread-safe producer methods."""

    def __init__(self, engine, store: FrameStore, cfg: CollectorConfig, round_cfg: AdaptConfig | None = None,
                 has_teacher: bool = False, use_perception_features: bool = False, nice_level: int = 0,
                 on_round_due=None, log=None):
        cfg.validate()
        self.engine, self.store, self.cfg = engine, store, cfg
        self.round_cfg = round_cfg or AdaptConfig()  # which unlabelled frames a round can use
        self.has_teacher = has_teacher
        self.use_perception_features = use_perception_features
        self.nice_level = int(nice_level)
        self.on_round_due = on_round_due
        self._log = log or (lambda msg: None)
        budget = cfg.memory_max_bytes
        self._frames = ByteBoundedQueue(budget - budget // 4, FRAME_QUEUE_ITEMS)
        self._labels: collections.deque = collections.deque(maxlen=4096)
        self.recent = RecentFrames(budget // 4, RECENT_FRAMES, cfg.label_pending_s)
        self._features: collections.OrderedDict = collections.OrderedDict()  # stamp -> [D]
        self._features_cond = threading.Condition()
        self._pending: dict[int, tuple[str, float]] = {}  # stamp -> (class name, monotonic time)
        self._generation = 0  # bumped by wipe(): frames taken in before it are never stored
        self._selector = Selector(self.round_cfg.seed)
        self._last_sample = 0.0
        self._warned: dict[str, float] = {}
        self.since_round = 0  # new trainable frames since the last round started
        self.counters: collections.Counter = collections.Counter()
        self.bad_frames: collections.Counter = collections.Counter()  # by reason
        self.bad_labels: collections.Counter = collections.Counter()
        self.bad_features: collections.Counter = collections.Counter()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- producer side (callbacks) ---------------------------------------------------------------------------
    def put_frame(self, msg) -> None:
        """A sensor_msgs/Image or CompressedImage; never blocks (the oldest queued frames are dropped)."""
        self._frames.put(msg, len(msg.data))
        self.counters['frames_received'] += 1
        self._wake.set()

    def put_label(self, stamp: int, name: str) -> str | None:
        """Queue a label for the frame with ``stamp``; a malformed one is counted -> its reason, else None."""
        self.counters['labels_received'] += 1
        if not name:
            reason = 'no_class_id'
        elif not valid_stamp(stamp):
            reason = 'bad_stamp'
        else:
            reason = None if check_class_name(name) is None else 'bad_class_name'
        if reason is not None:
            self.counters['labels_bad'] += 1
            self.bad_labels[reason] += 1
            return reason
        self._labels.append((int(stamp), str(name)))
        self._wake.set()
        return None

    def put_features(self, msg) -> str | None:
        """The perception node's pooled features (sensor_msgs/Image 32FC1, 1 x D), kept briefly by stamp;
        a malformed message is counted (``features_bad``) -> its reason, else None."""
        feats, reason = features_from_fields(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian,
                                             msg.data, self.engine.head.feature_size)
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        if reason is None and not valid_stamp(stamp):
            reason = 'bad_stamp'
        if reason is not None:
            self.counters['features_bad'] += 1
            self.bad_features[reason] += 1
            return reason
        with self._features_cond:
            self._features[stamp] = feats
            while len(self._features) > RECENT_FRAMES:
                self._features.popitem(last=False)
            self._features_cond.notify_all()
        return None

    # -- the worker thread -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name='edge_tl_adapt_worker', daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._features_cond:
            self._features_cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        if self.nice_level:  # Linux: per-thread niceness; this inference must not compete with perception
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice_level))
            except (OSError, AttributeError):
                pass
        while not self._stop.is_set():
            woken = self._wake.wait(min(1.0, self.cfg.label_pending_s))  # timeout: expire old entries
            self._wake.clear()
            try:
                if woken:
                    self.process()
                else:
                    self.expire()
            except Exception as e:  # never let one message kill the worker
                self.counters['worker_errors'] += 1
                self._warn('worker', f'adaptation worker: {type(e).__name__}: {e}')
            n = self.cfg.every_n_labels
            if n > 0 and self.since_round >= n and self.on_round_due is not None:
                self.on_round_due()

    def process(self) -> None:
        """Everything queued: frames -> recent ring (cheap), labels -> store/ring/pending; between the slow
        steps (inference + a store write per labelled frame) the queues are drained again."""
        todo: collections.deque = collections.deque()  # (RecentFrame, label)
        newest = None
        while not self._stop.is_set():
            while (msg := self._frames.get()) is not None:
                self.counters['frames_handled'] += 1
                frame = self._take_in(msg)  # the full frame is released after this
                if frame is None:
                    continue
                pending = self._pending.pop(frame.stamp, None)
                if pending is not None:
                    todo.append((frame, pending[0]))
                else:
                    self.recent.put(frame)
                    newest = frame
            while self._labels:
                stamp, name = self._labels.popleft()
                self.counters['labels_handled'] += 1
                frame = self._handle_label(stamp, name)
                if frame is not None:
                    todo.append((frame, name))
            if not todo:
                break
            self._ingest(*todo.popleft())
        rate = self.cfg.sample_rate_hz
        now = time.monotonic()
        if newest is not None and rate > 0 and now - self._last_sample >= 1.0 / rate \
                and newest.stamp in self.recent:
            self._last_sample = now
            self._ingest(newest, None)
        self.expire()

    def _take_in(self, msg) -> RecentFrame | None:
        """A message -> what is kept of it (small crops; a compressed payload as it came), or None for a bad
        frame (counted by reason)."""
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        frame = RecentFrame(stamp, time.monotonic(), self._generation)
        try:
            if not valid_stamp(stamp):
                raise FrameError('bad_stamp', f'header stamp {msg.header.stamp.sec}.'
                                              f'{msg.header.stamp.nanosec:09d} is not a valid time')
            if is_compressed(msg):  # decoded only if it is needed
                frame.payload, frame.fmt = bytes(msg.data), str(msg.format)
            else:
                self._shrink(frame, *decode_message(msg))
        except Exception as e:
            self._bad_frame(e)
            return None
        return frame

    def _shrink(self, frame: RecentFrame, img, order: str) -> None:
        frame.crop, frame.small = shrink(img, order, self.store.crop_size, self.engine.input_hw)
        frame.order, frame.payload = order, None

    def _bad_frame(self, e: Exception) -> None:
        reason = e.reason if isinstance(e, FrameError) else 'inference_error'
        self.counters['frames_bad'] += 1
        self.bad_frames[reason] += 1
        self._warn('bad_frame', f'bad frame ({self.counters["frames_bad"]} so far): '
                                f'{e if isinstance(e, FrameError) else f"{type(e).__name__}: {e}"}')

    def _warn(self, key: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= WARN_EVERY_S:
            self._warned[key] = now
            self._log(msg)

    def expire(self) -> None:
        """Drop remembered frames and pending labels older than ``label_pending_s``."""
        self.recent.ttl_s = self.cfg.label_pending_s
        self.recent.expire()
        if not self._pending:
            return
        now = time.monotonic()
        for s in [s for s, (_, t) in list(self._pending.items()) if now - t > self.cfg.label_pending_s]:
            if self._pending.pop(s, None) is not None:
                self.counters['labels_expired'] += 1

    def _handle_label(self, stamp: int, name: str) -> RecentFrame | None:
        """Apply a label; returns the remembered frame if it still has to be ingested with this label."""
        if self.store.set_label(stamp, name, 'topic'):
            self._label_applied(name)
            return None
        if stamp in self.store:  # exists, but the rewrite failed (disk) or a better label exists
            self.counters['labels_not_applied'] += 1
            return None
        frame = self.recent.pop(stamp)
        if frame is not None:
            return frame
        if len(self._pending) >= MAX_PENDING_LABELS:
            self._pending.pop(next(iter(self._pending)))
            self.counters['labels_expired'] += 1
        self._pending[stamp] = (name, time.monotonic())
        return None

    def _label_applied(self, name: str) -> None:
        self.counters['labels_applied'] += 1
        self.since_round += 1
        if name not in self.engine.head.class_names:
            self.counters['labels_unknown_class'] += 1

    def _perception_features(self, stamp: int):
        with self._features_cond:
            self._features_cond.wait_for(lambda: stamp in self._features or self._stop.is_set(),
                                         FEATURES_WAIT_S)
            return self._features.pop(stamp, None)

    def _ingest(self, frame: RecentFrame, label: str | None) -> None:
        """Student features/probs for one frame, then store it if labelled or selected."""
        try:
            if frame.payload is not None:
                self._shrink(frame, *decode_compressed(frame.fmt, frame.payload))
            feats = self._perception_features(frame.stamp) if self.use_perception_features else None
            if feats is not None:  # the perception node already ran the backbone on this frame
                head = self.engine.head
                pred = Prediction(softmax(head.logits(feats)[None])[0], feats, head)
                if not np.isfinite(pred.probs).all():  # (the features were checked on arrival)
                    raise FrameError('non_finite', 'the head gave NaN/Inf scores on perception features')
                self.counters['features_reused'] += 1
            else:  # = the full frame's features; FrameError non_finite on NaN/Inf
                pred = self.engine.infer(frame.small, frame.order)
        except Exception as e:  # FrameError, or anything else one odd frame triggers: count it, go on
            self._bad_frame(e)
            return
        self.counters['frames_evaluated'] += 1
        if label is None and not self._selector.select(pred.probs, policy=self.cfg.selection,
                                                       rate=self.cfg.keep_fraction)[0]:
            return  # still in the recent ring: a late label can take it
        if frame.generation != self._generation:  # wipe() ran since this frame came in
            self.counters['frames_wiped'] += 1
            return
        source = 'topic' if label else ''
        if self.store.add(frame.stamp, frame.crop, pred.features, pred.probs, label, source):
            self.counters['frames_stored'] += 1
            if label:
                self._label_applied(label)
            elif self._trainable_unlabelled(pred.probs):
                self.since_round += 1
        else:
            self.counters['frames_not_stored'] += 1
            self._warn('store', f'frame store write failed ({self.store.dropped} dropped): '
                                f'{self.store.last_error}')

    def _trainable_unlabelled(self, probs) -> bool:
        srcs = self.round_cfg.label_sources
        return (self.has_teacher and 'teacher' in srcs) or \
            ('self' in srcs and float(np.max(probs)) >= self.round_cfg.self_label_threshold)

    # -- control and status ----------------------------------------------------------------------------------
    def wipe(self) -> tuple[int, int]:
        """Forget everything taken in so far (memory and store) -> (entries deleted, entries left)."""
        self._generation += 1  # a frame the worker holds right now carries the old generation
        self._frames.clear()
        self.recent.clear()
        with self._features_cond:
            self._features.clear()
        self._pending.clear()
        n = self.store.wipe()
        self.since_round = 0
        return n, self.store.remaining_entries()

    @property
    def pending_labels(self) -> int:
        return len(self._pending)

    def frames_dropped(self) -> int:
        return max(0, self.counters['frames_received'] - self.counters['frames_handled'] - len(self._frames))

    def labels_dropped(self) -> int:
        """Labels that overflowed the queue (a label flood): received - malformed - handled - queued."""
        c = self.counters
        return max(0, c['labels_received'] - c['labels_bad'] - c['labels_handled'] - len(self._labels))

    def memory(self) -> dict:
        return {'queued_frames': len(self._frames), 'queued_bytes': self._frames.nbytes,
                'recent_frames': len(self.recent), 'recent_bytes': self.recent.nbytes,
                'max_bytes': self.cfg.memory_max_bytes}
