"""adaptation_node: collects frames and labels on the robot and trains better heads, off the hot path.

Data path:
  ``image`` (or ``image/compressed``) callback -> a queue bounded by bytes (newest frames win) -> worker
  thread: decode (zero-copy view) -> shrink to the store's RGB crop + the student's input size (the
  full frame is released here; :mod:`edge_tl_ros.recent` remembers the small copies a late label may
  still claim, bounded by ``memory_max_bytes``) -> own student :class:`Engine` (1 thread, low priority)
  -> features + probs -> keep it? (labelled, or sampled at ``sample_rate_hz`` and chosen by
  ``selection``) -> :class:`FrameStore` (crash-safe, bounded). With ``use_perception_features``
  (perception in deployment mode ``incremental``) the backbone features come from
  ``<perception_node>/features`` by stamp instead (malformed or non-finite ones are counted and ignored).
  ``labels`` (vision_msgs/Classification: the labelled frame's stamp + results[0].class_id) -> the same
  worker: label the stored entry with that stamp, or store the recent frame with that stamp, or keep
  the label briefly (``label_pending_s``) until the frame arrives.

A round (``~/adapt_now``, every ``adapt_every_n_labels`` new labels, or every ``adapt_period_s``) runs
in a separate, niced process (:func:`edge_tl_ros.adapt.run_round_in_subprocess`) started from a round
thread, so no callback blocks. An accepted head is written with ``HeadRegistry.add`` (atomic) and
``<perception_node>/reload_head`` is called asynchronously. A rejected, failed or killed round changes
nothing. Publishes ``~/status`` (std_msgs/String JSON, latched) and ``/diagnostics``. Never publishes
frames or features.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger
from vision_msgs.msg import Classification

from ..adapt import POLICIES, AdaptConfig, Adapter, run_round_in_subprocess
from ..bundle import (BundleError, HeadRegistry, check_class_name, default_state_dir, load_bundle,
                      resolve_bundle_path)
from ..engine import Engine, Prediction, softmax
from ..imaging import FrameError, decode_compressed, image_view
from ..recent import ByteBoundedQueue, RecentFrame, RecentFrames, features_from_fields, shrink
from ..store import LABEL_SOURCES, FrameStore, stamp_to_ns, valid_stamp
from .params import declare_all, run_node

_NODE_NAME = re.compile(r'^/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$')
RECENT_FRAMES = 64  # frames remembered (as small crops) for labels that arrive after their frame
MAX_PENDING_LABELS = 512
WARN_WINDOW_S = 10.0  # /diagnostics WARNs for bad input / failed writes seen within this window
FRAME_QUEUE_ITEMS = 16  # messages between the callback and the worker (also bounded by bytes)
RELOAD_TIMEOUT_S = 10.0  # a reload_head call without an answer (perception killed mid-call) gives up


# name -> (default, descriptor kwargs)
PARAMETERS = {
    'model_bundle': ('', dict(text='Student model bundle: a directory or the name of a shipped bundle '
                                   '("" = gtsrb_student); the same as the perception node\'s.',
                              read_only=True)),
    'teacher_bundle': ('', dict(text='Teacher bundle for pseudo-labels: a directory or the name of a '
                                     'shipped bundle ("" = none).', read_only=True)),
    'state_dir': ('', dict(text='Directory of head versions, shared with the perception node '
                                '("" = $ROS_HOME/edge_tl_ros/<bundle name>).', read_only=True)),
    'store_dir': ('', dict(text='Frame store directory: empty or the store\'s own, never shared with other '
                                'files ("" = <state_dir>/store).', read_only=True)),
    'store_max_entries': (2000, dict(text='Frame store: maximum number of entries (oldest evicted).',
                                     int_range=(1, 10_000_000))),
    'store_max_bytes': (256 << 20, dict(text='Frame store: maximum bytes on disk (oldest evicted).',
                                        int_range=(4096, 1 << 50))),
    'store_max_age_s': (7 * 86400.0, dict(text='Frame store: entries older than this are evicted '
                                                '(0 = no age limit).', float_range=(0.0, 1e10))),
    'crop_size': (64, dict(text='Side length (pixels) of the RGB crops kept in the store (teacher input).',
                           read_only=True, int_range=(8, 1024))),
    'sample_rate_hz': (2.0, dict(text='Unlabelled frames evaluated for selection per second (labelled '
                                      'frames are always taken; 0 = labelled frames only).',
                                 float_range=(0.0, 1000.0))),
    'keep_fraction': (0.5, dict(text='Average fraction of sampled unlabelled frames stored.',
                                float_range=(0.0, 1.0))),
    'selection': ('informative', dict(text='Which sampled frames to keep: informative prefers low student '
                                           'confidence, uniform keeps at random.', choices=POLICIES)),
    'label_sources': (['topic', 'teacher'], dict(text='Labels a round may use (subset of topic, teacher, '
                                                      'self).')),
    'self_label_threshold': (0.95, dict(text='Student confidence needed for a self pseudo-label.',
                                        float_range=(0.0, 1.0))),
    'teacher_min_confidence': (0.7, dict(
        text='Confidence needed for a teacher pseudo-label (of the teacher x student ensemble when '
             'teacher_student_ensemble; a shifted domain makes both wrong too, confident answers are wrong '
             'far less often).', float_range=(0.0, 1.0))),
    'teacher_student_ensemble': (True, dict(
        text='Pseudo-label with the geometric mean of teacher and current head probabilities (they err '
             'differently under a shift) instead of the teacher alone.')),
    'student_test_time_norm': (True, dict(
        text='The student side of that ensemble is the bundle\'s own student re-normalised to batches of '
             'stored robot frames, like the teacher (needs norm_stats.npz in the model bundle; only labels '
             'use it, the deployed backbone is unchanged); false: the current head on the stored features.')),
    'teacher_test_time_norm': (True, dict(text='The teacher normalises its activations with statistics of '
                                               'batches of stored robot frames (needs norm_stats.npz in the '
                                               'teacher bundle): far better labels under a domain shift.')),
    'teacher_batch_size': (64, dict(text='Frames per teacher batch under test-time normalisation (more: '
                                         'steadier statistics, more memory in the training process).',
                                    int_range=(16, 4096))),
    'adapt_every_n_labels': (50, dict(text='Start a round after this many new labels (0 = off).',
                                      int_range=(0, 10_000_000))),
    'adapt_period_s': (0.0, dict(text='Start a round this often (0 = off).', float_range=(0.0, 1e7))),
    'min_labelled': (30, dict(text='Labelled frames needed before a round trains.',
                              int_range=(2, 10_000_000))),
    'holdout_fraction': (0.3, dict(text='Fraction of trusted labels held out to validate a new head.',
                                   float_range=(0.05, 0.9))),
    'margin': (0.02, dict(text='Holdout accuracy must improve by at least this much.',
                          float_range=(-1.0, 1.0))),
    'anchor_tolerance': (0.05, dict(text='Maximum allowed drop of accuracy on the bundle\'s anchor set.',
                                    float_range=(0.0, 1.0))),
    'anchor_replay': (0.5, dict(text='Weight of replayed anchor (source-domain) samples relative to '
                                     'local ones (0 = no replay).', float_range=(0.0, 100.0))),
    'l2_to_prior': (0.01, dict(text='Regularisation of the new head toward the current one.',
                               float_range=(0.0, 1e9))),
    'allow_new_classes': (False, dict(text='Labels naming classes the head does not know add classes.')),
    'refit_after_accept': (True, dict(text='Once a round\'s head is accepted, retrain it the same way on '
                                           'every labelled frame, the holdout included (kept only if it '
                                           'passes the anchor check too).')),
    'train_threads': (1, dict(text='BLAS / ONNX Runtime threads of the training process.',
                              int_range=(1, 64))),
    'nice_level': (10, dict(text='Niceness added to the training process (0-19).', int_range=(0, 19))),
    'round_sched_idle': (True, dict(text='Linux: run the training process under SCHED_IDLE (only on CPU time '
                                         'nothing else wants; perception preempts it at once).')),
    'round_timeout_s': (600.0, dict(text='A round running longer than this is killed.',
                                    float_range=(1.0, 86400.0))),
    'perception_node': ('perception', dict(text='Name of the perception node whose <name>/reload_head is '
                                                'called after an accepted round.')),
    'use_compressed': (False, dict(text='Subscribe image/compressed instead of image.', read_only=True)),
    'use_perception_features': (False, dict(
        text='Take backbone features from <perception_node>/features (perception in deployment_mode '
             'incremental), matched by frame stamp, instead of running the backbone here.', read_only=True)),
    'label_pending_s': (10.0, dict(text='How long a label waits for its frame (and a frame for its label).',
                                   float_range=(0.1, 3600.0))),
    'memory_max_bytes': (64 << 20, dict(
        text='Camera data held in memory: incoming messages waiting for the worker plus the small crops '
             'of recent frames a late label can claim (oldest dropped first; the newest message is always '
             'kept).', int_range=(1 << 20, 1 << 40), read_only=True)),
    'keep_head_versions': (20, dict(
        text='Adapted head versions kept on disk (older ones are deleted, never the current one or its '
             'rollback target; 0 = keep all).', int_range=(0, 1_000_000), read_only=True)),
    'diagnostics_period_s': (1.0, dict(text='Diagnostics and status publishing period.',
                                       float_range=(0.1, 60.0), read_only=True)),
    'executor_threads': (1, dict(
        text='Executor threads when run as its own process (adaptation_node main). 1 = rclpy '
             'SingleThreadedExecutor: about 40 % less CPU for taking in 30 Hz camera frames than the '
             '4-thread MultiThreadedExecutor (rounds train in their own process, the reload call is '
             'asynchronous); > 1 = MultiThreadedExecutor.', read_only=True, int_range=(1, 16))),
}

# parameter -> AdaptConfig field
_CONFIG_FIELDS = ('min_labelled', 'holdout_fraction', 'margin', 'anchor_tolerance', 'l2_to_prior',
                  'label_sources', 'self_label_threshold', 'teacher_min_confidence', 'allow_new_classes',
                  'anchor_replay', 'teacher_test_time_norm', 'teacher_batch_size', 'teacher_student_ensemble',
                  'refit_after_accept', 'student_test_time_norm')


class AdaptationNode(Node):
    """Frame collection, labels and adaptation rounds; usable in-process (tests) or via ``main``."""

    def __init__(self, node_name: str = 'adaptation', **kwargs):
        super().__init__(node_name, **kwargs)
        declare_all(self, PARAMETERS)
        err = self._validate({n: self._p(n) for n in PARAMETERS})
        if err:
            raise ValueError(err)
        p = self._p
        self.bundle = load_bundle(resolve_bundle_path(p('model_bundle')))
        self.state_dir = p('state_dir') or str(default_state_dir(self.bundle.name))
        self.registry = HeadRegistry(self.bundle, self.state_dir, keep_versions=p('keep_head_versions'))
        head, warn = self.registry.load_current_or_fallback()
        if warn:
            self.get_logger().warning(warn)
        self.engine = Engine(self.bundle, 'feature_extractor', num_threads=1, low_priority=True, head=head)
        size = p('crop_size')
        self.store = FrameStore(p('store_dir') or f'{self.state_dir}/store', p('store_max_entries'),
                                p('store_max_bytes'), p('store_max_age_s'), crop_size=(size, size),
                                feature_size=self.bundle.feature_size)  # StoreError: a directory not its own
        if self.store.corrupt_removed:
            self.get_logger().warning(f'frame store: removed {self.store.corrupt_removed} corrupt entries')
        if self.store.skipped:
            self.get_logger().warning(f'frame store: left alone files it did not write: {self.store.skipped}')
        self.adapter = Adapter(self.bundle, self.registry, self._config())
        self.teacher: str | None = None
        self.teacher_error: str | None = None
        if p('teacher_bundle'):
            try:  # check now, not in the first round; a bad teacher costs its labels, not the node
                tb = load_bundle(resolve_bundle_path(p('teacher_bundle')))
                self.teacher = str(tb.root)
            except BundleError as e:
                self.teacher_error = f'teacher_bundle unusable, running without teacher labels: {e}'
                self.get_logger().error(self.teacher_error)

        # worker state (frames/labels are handed over through deques; the worker owns the store writes)
        budget = p('memory_max_bytes')
        self._frames = ByteBoundedQueue(budget - budget // 4, FRAME_QUEUE_ITEMS)  # msg, len(msg.data)
        self._labels: collections.deque = collections.deque(maxlen=4096)
        self._recent = RecentFrames(budget // 4, RECENT_FRAMES, p('label_pending_s'))  # stamp -> crops
        self._generation = 0  # bumped by ~/wipe_store: frames taken in before it are never stored
        self._pending: dict[int, tuple[str, float]] = {}  # stamp -> (class name, monotonic time)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_sample = 0.0
        self.counters = collections.Counter()
        self.bad_reasons: collections.Counter = collections.Counter()  # frames, by reason
        self.bad_labels: collections.Counter = collections.Counter()  # label messages, by reason
        self.bad_features: collections.Counter = collections.Counter()  # ~/features messages, by reason
        self._fault_history: collections.deque = collections.deque([(time.monotonic(), {})])
        self._since_round = 0  # new trainable frames since the last round started
        self._round_lock = threading.Lock()
        self._round_thread: threading.Thread | None = None
        self.round_running = False
        self.round_pid: int | None = None
        self.rounds = 0
        self.last_round: dict | None = None
        self.reload: dict | None = None
        self._reload_pending = None  # (future, client, monotonic time sent) of an unanswered reload call
        self._reload_clients: dict[str, object] = {}

        in_group = MutuallyExclusiveCallbackGroup()
        if p('use_compressed'):
            self.create_subscription(CompressedImage, 'image/compressed', self._on_frame,
                                     qos_profile_sensor_data, callback_group=in_group)
        else:
            self.create_subscription(Image, 'image', self._on_frame, qos_profile_sensor_data,
                                     callback_group=in_group)
        self._perception_features: collections.OrderedDict = collections.OrderedDict()  # stamp -> [D]
        self._use_pf = p('use_perception_features')
        if self._use_pf:
            self.create_subscription(Image, f'{p("perception_node").rstrip("/")}/features',
                                     self._on_features, 10, callback_group=in_group)
        label_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                               reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(Classification, 'labels', self._on_label, label_qos,
                                 callback_group=MutuallyExclusiveCallbackGroup())
        srv_group = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, '~/adapt_now', self._srv_adapt_now, callback_group=srv_group)
        self.create_service(Trigger, '~/wipe_store', self._srv_wipe, callback_group=srv_group)
        self._client_group = ReentrantCallbackGroup()
        status_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub_status = self.create_publisher(String, '~/status', status_qos)
        self.pub_diag = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        timer_group = MutuallyExclusiveCallbackGroup()
        self.create_timer(p('diagnostics_period_s'), self._on_timer, callback_group=timer_group)
        self._last_periodic_round = time.monotonic()
        self._reload_client()  # discover the perception service early
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._worker = threading.Thread(target=self._run, name='edge_tl_adapt_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'bundle {self.bundle.name}, head v{self.engine.head.version}, store {self.store.root} '
            f'({len(self.store)} entries), teacher {self.teacher or "none"}, '
            f'label sources {list(p("label_sources"))}')
        self._publish_status()

    # -- parameters --------------------------------------------------------------------------------------
    def _p(self, name):
        return self.get_parameter(name).value

    @staticmethod
    def _validate(values: dict) -> str | None:
        """Reason why ``values`` (all parameters) are not acceptable, or None."""
        for name, (_, dkw) in PARAMETERS.items():
            v = values[name]
            r = dkw.get('int_range') or dkw.get('float_range')
            if r is not None and not (r[0] <= v <= r[1]):
                return f'{name}={v} is outside [{r[0]}, {r[1]}]'
            if dkw.get('choices') and v not in dkw['choices']:
                return f'{name}={v!r} is not one of {list(dkw["choices"])}'
        srcs = list(values['label_sources'])
        if not srcs or not set(srcs) <= set(LABEL_SOURCES) or len(set(srcs)) != len(srcs):
            return (f'label_sources={srcs} must be a non-empty list of distinct values from '
                    f'{list(LABEL_SOURCES)}')
        if not _NODE_NAME.match(values['perception_node']):
            return f'perception_node={values["perception_node"]!r} is not a valid node name'
        try:
            AdaptConfig(**{f: values[f] for f in _CONFIG_FIELDS}).validate()
        except (ValueError, TypeError) as e:
            return str(e)
        return None

    def _on_set_parameters(self, params) -> SetParametersResult:
        values = {n: self._p(n) for n in PARAMETERS}
        for prm in params:
            if prm.name in values:
                values[prm.name] = prm.value
        err = self._validate(values)
        if err:
            return SetParametersResult(successful=False, reason=err)
        names = {prm.name for prm in params}
        if names & {'store_max_entries', 'store_max_bytes', 'store_max_age_s'}:
            self.store.set_caps(values['store_max_entries'], values['store_max_bytes'],
                                values['store_max_age_s'])
        if 'label_pending_s' in names:
            self._recent.ttl_s = float(values['label_pending_s'])
        if names & set(_CONFIG_FIELDS):
            self.adapter.config = AdaptConfig(**{f: values[f] for f in _CONFIG_FIELDS})
        return SetParametersResult(successful=True)

    def _config(self) -> AdaptConfig:
        return AdaptConfig(**{f: self._p(f) for f in _CONFIG_FIELDS})

    # -- callbacks (never block: hand over to the worker) -------------------------------------------------
    def _on_frame(self, msg) -> None:
        self._frames.put(msg, len(msg.data))
        self.counters['frames_received'] += 1
        self._wake.set()

    def _on_features(self, msg: Image) -> None:
        """Pooled features from the perception node (incremental mode), kept briefly by stamp; a
        malformed message is counted (``features_bad``, by reason in ``bad_features``) and ignored."""
        feats, reason = features_from_fields(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian,
                                             msg.data, self.bundle.feature_size)
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        if reason is None and not valid_stamp(stamp):
            reason = 'bad_stamp'
        if reason is not None:
            self.counters['features_bad'] += 1
            self.bad_features[reason] += 1
            return
        self._perception_features[stamp] = feats
        while len(self._perception_features) > RECENT_FRAMES:
            self._perception_features.popitem(last=False)

    def _wait_perception_features(self, stamp: int, timeout: float = 0.25):
        """The perception node's features for ``stamp`` (they trail the frame by one inference)."""
        deadline = time.monotonic() + timeout
        while True:
            feats = self._perception_features.pop(stamp, None)
            if feats is not None or time.monotonic() > deadline or self._stop.is_set():
                return feats
            time.sleep(0.005)

    def _on_label(self, msg: Classification) -> None:
        self.counters['labels_received'] += 1
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        name = msg.results[0].class_id if msg.results else ''
        if not name:
            reason = 'no_class_id'
        elif not valid_stamp(stamp):
            reason = 'bad_stamp'
        else:
            bad = check_class_name(name)
            reason = None if bad is None else 'bad_class_name'
        if reason is not None:
            self.counters['labels_bad'] += 1
            self.bad_labels[reason] += 1
            self.get_logger().warning(f'label message ignored ({reason}; '
                                      f'{self.counters["labels_bad"]} so far)', throttle_duration_sec=5.0)
            return
        self._labels.append((stamp, str(name)))
        self._wake.set()

    # -- worker ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:  # Linux: a per-thread nice value; student inference here must not compete with perception
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + self._p('nice_level')))
        except (OSError, AttributeError):
            pass
        while not self._stop.is_set():
            if not self._wake.wait(0.2):
                self._expire_pending()
                continue
            self._wake.clear()
            try:
                self._work()
            except Exception as e:  # never let one message kill the worker
                self.counters['worker_errors'] += 1
                self.get_logger().error(f'adaptation worker: {type(e).__name__}: {e}',
                                        throttle_duration_sec=5.0)
            self._maybe_start_round()

    def _work(self) -> None:
        """Frames -> recent ring (cheap), labels -> store/ring/pending; between the slow steps (student
        inference + a store write per labelled frame) the queues are drained again so none overflows."""
        todo: collections.deque = collections.deque()  # (RecentFrame, label)
        newest = None
        while not self._stop.is_set():
            while True:
                msg = self._frames.get()
                if msg is None:
                    break
                self.counters['frames_handled'] += 1
                frame = self._take_in(msg)  # the full frame is released after this
                if frame is None:
                    continue
                pending = self._pending.pop(frame.stamp, None)
                if pending is not None:
                    todo.append((frame, pending[0]))
                else:
                    self._recent.put(frame)
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
        rate = self._p('sample_rate_hz')
        now = time.monotonic()
        if newest is not None and rate > 0 and now - self._last_sample >= 1.0 / rate \
                and newest.stamp in self._recent:
            self._last_sample = now
            self._ingest(newest, None)
        self._expire_pending()

    def _take_in(self, msg) -> RecentFrame | None:
        """A message -> what the node keeps of it (small crops; a compressed payload as it came), or
        None for a bad frame (counted by reason)."""
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        frame = RecentFrame(stamp, time.monotonic(), self._generation)
        try:
            if not valid_stamp(stamp):
                raise FrameError('bad_stamp', f'header stamp {msg.header.stamp.sec}.'
                                              f'{msg.header.stamp.nanosec:09d} is not a valid time')
            if isinstance(msg, CompressedImage):
                frame.payload, frame.fmt = bytes(msg.data), str(msg.format)
            else:
                self._shrink(frame, *image_view(msg.encoding, msg.height, msg.width, msg.step,
                                                msg.is_bigendian, msg.data))
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
        self.bad_reasons[reason] += 1
        self.get_logger().warning(f'bad frame ({self.counters["frames_bad"]} so far): '
                                  f'{e if isinstance(e, FrameError) else f"{type(e).__name__}: {e}"}',
                                  throttle_duration_sec=5.0)

    def _expire_pending(self) -> None:
        self._recent.expire()
        if not self._pending:
            return
        ttl = self._p('label_pending_s')
        now = time.monotonic()
        for s in [s for s, (_, t) in list(self._pending.items()) if now - t > ttl]:
            if self._pending.pop(s, None) is not None:
                self.counters['labels_expired'] += 1

    def _handle_label(self, stamp: int, name: str):
        """Apply a label; returns the remembered frame if it still has to be ingested with this label."""
        if self.store.set_label(stamp, name, 'topic'):
            self._label_applied(name)
            return None
        if stamp in self.store:  # exists, but the rewrite failed (disk) or a better label exists
            self.counters['labels_not_applied'] += 1
            return None
        frame = self._recent.pop(stamp)
        if frame is not None:
            return frame
        if len(self._pending) >= MAX_PENDING_LABELS:
            self._pending.pop(next(iter(self._pending)))
            self.counters['labels_expired'] += 1
        self._pending[stamp] = (name, time.monotonic())
        return None

    def _label_applied(self, name: str) -> None:
        self.counters['labels_applied'] += 1
        self._since_round += 1
        if name not in self.engine.head.class_names:
            self.counters['labels_unknown_class'] += 1

    def _ingest(self, frame: RecentFrame, label: str | None) -> None:
        """Student features/probs for one frame, then store it if labelled or selected."""
        try:
            if frame.payload is not None:  # compressed: decoded only now that it is needed
                self._shrink(frame, *decode_compressed(frame.fmt, frame.payload))
            feats = self._wait_perception_features(frame.stamp) if self._use_pf else None
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
        if label is None:
            keep = self.adapter.select(pred.features, pred.probs, policy=self._p('selection'),
                                       rate=self._p('keep_fraction'))[0]
            if not keep:
                return  # still in the recent ring: a late label can take it
        if frame.generation != self._generation:  # ~/wipe_store ran since this frame came in
            self.counters['frames_wiped'] += 1
            return
        source = 'topic' if label else ''
        if self.store.add(frame.stamp, frame.crop, pred.features, pred.probs, label, source):
            self.counters['frames_stored'] += 1
            if label:
                self._label_applied(label)
            elif self._unlabelled_trainable(pred.probs):
                self._since_round += 1
        else:
            self.counters['frames_not_stored'] += 1
            self.get_logger().warning(f'frame store write failed ({self.store.dropped} dropped): '
                                      f'{self.store.last_error}', throttle_duration_sec=10.0)

    def _unlabelled_trainable(self, probs) -> bool:
        srcs = self.adapter.config.label_sources
        return (self.teacher is not None and 'teacher' in srcs) or \
            ('self' in srcs and float(np.max(probs)) >= self.adapter.config.self_label_threshold)

    # -- rounds ------------------------------------------------------------------------------------------
    def _maybe_start_round(self) -> None:
        n = self._p('adapt_every_n_labels')
        if n > 0 and self._since_round >= n:
            self.start_round('new labels')

    def start_round(self, why: str) -> tuple[bool, str]:
        """Start a round in the background; returns (started, message)."""
        with self._round_lock:
            if self.round_running:
                return False, 'a round is already running'
            if self._stop.is_set():
                return False, 'node is shutting down'
            self.round_running = True
            self._since_round = 0
            self._round_thread = threading.Thread(target=self._round, args=(why,), name='edge_tl_round',
                                                  daemon=True)
            self._round_thread.start()
        return True, f'round started ({why})'

    def _round(self, why: str) -> None:
        t0 = time.time()
        try:
            cfg = self._config()
            self.get_logger().info(f'adaptation round started ({why}), base head v{self.engine.head.version}')
            self.round_pid = None

            def started(pid):
                self.round_pid = pid
                self._publish_status()

            try:
                base = self.registry.current_version
            except BundleError:
                base = None
            result = run_round_in_subprocess(
                self.bundle.root, self.state_dir, self.store.root, cfg, base_version=base,
                teacher_bundle=self.teacher, nice_level=self._p('nice_level'),
                threads=self._p('train_threads'), timeout_s=self._p('round_timeout_s'), cancel=self._stop,
                on_start=started, sched_idle=self._p('round_sched_idle'))
            for stamp, name in result.teacher_labels.items():
                self.store.set_label(stamp, name, 'teacher')
            summary = result.summary()
            summary.update(started=t0, finished=time.time(), trigger=why, committed_version=None)
            if result.accepted:
                try:
                    head = self.adapter.commit(result)  # HeadRegistry.add: atomic file + index
                except (BundleError, OSError, ValueError) as e:
                    summary.update(accepted=False, failed=True, reason=f'could not write the head: {e}')
                    self.get_logger().error(summary['reason'])
                else:
                    self.engine.swap_head(head)
                    summary['committed_version'] = head.version
                    self.get_logger().info(f'round accepted: head v{head.version} ({result.reason})')
                    self._request_reload(head.version)
            else:
                # one call site per severity: rclpy raises "Logger severity cannot be changed between
                # calls" when the same line logs at two severities (it crashed every later round)
                if result.failed:
                    self.get_logger().warning(f'round failed: {result.reason}')
                else:
                    self.get_logger().info(f'round rejected: {result.reason}')
            self.last_round = summary
            self.rounds += 1
        except Exception as e:  # the round thread must always clear round_running
            self.last_round = {'accepted': False, 'failed': True, 'reason': f'{type(e).__name__}: {e}',
                               'started': t0, 'finished': time.time(), 'trigger': why, 'metrics': {}}
            self.get_logger().error(f'adaptation round crashed: {e}')
        finally:
            self.round_running = False
            self.round_pid = None
            if not self._stop.is_set():
                self._publish_status()

    def _reload_client(self):
        name = self._p('perception_node').rstrip('/')
        cli = self._reload_clients.get(name)
        if cli is None:
            cli = self.create_client(Trigger, f'{name}/reload_head', callback_group=self._client_group)
            self._reload_clients[name] = cli
        return cli

    def _request_reload(self, version: int) -> None:
        cli = self._reload_client()
        self.reload = {'version': version, 'service': cli.srv_name, 'done': False, 'success': None,
                       'message': 'waiting for the service'}
        if not cli.wait_for_service(timeout_sec=2.0):
            self.reload.update(done=True, success=False,
                               message=f'{cli.srv_name} not available; the perception node loads '
                                       f'v{version} (the registry\'s current head) when it starts')
            self.get_logger().warning(self.reload['message'])
            return
        future = cli.call_async(Trigger.Request())
        self._reload_pending = (future, cli, time.monotonic())

        def done(fut, info=self.reload):
            if info['done']:  # already given up on (timeout)
                return
            try:
                res = fut.result()
                info.update(done=True, success=bool(res.success), message=res.message)
            except Exception as e:  # service went away
                info.update(done=True, success=False, message=f'{type(e).__name__}: {e}')
            if info['success']:  # one call site per severity (see _round)
                self.get_logger().info(f'{info["service"]}: {info["message"]}')
            else:
                self.get_logger().warning(f'{info["service"]}: {info["message"]}')
            self._publish_status()

        future.add_done_callback(done)

    # -- services ----------------------------------------------------------------------------------------
    def _srv_adapt_now(self, request, response):
        response.success, response.message = self.start_round('adapt_now')
        return response

    def _srv_wipe(self, request, response):
        # nothing taken in before the wipe may reach the store afterwards: frames in memory are dropped,
        # and a frame the worker holds right now carries the old generation (_ingest checks it)
        self._generation += 1
        self._frames.clear()
        self._recent.clear()
        self._perception_features.clear()
        self._pending.clear()
        n = self.store.wipe()
        self._since_round = 0
        left = self.store.remaining_entries()
        if left:  # e.g. a read-only file system: say so, never report a wipe that did not happen
            response.success = False
            response.message = f'could not delete {left} stored frames: {self.store.last_error}'
            self.get_logger().error(response.message)
        else:
            response.success, response.message = True, f'wiped {n} stored frames'
            self.get_logger().info(response.message)
        self._publish_status()
        return response

    # -- status / diagnostics ----------------------------------------------------------------------------
    def _check_reload_timeout(self) -> None:
        """A perception node that dies after taking the request never answers (its service can stay
        discovered for a while): give up after RELOAD_TIMEOUT_S, say so, and drop the pending request."""
        pending = self._reload_pending
        if pending is None:
            return
        future, cli, t = pending
        if future.done():
            self._reload_pending = None
        elif time.monotonic() - t > RELOAD_TIMEOUT_S:
            self._reload_pending = None
            info = self.reload
            info.update(done=True, success=False,
                        message=f'{cli.srv_name} did not answer in {RELOAD_TIMEOUT_S:.0f} s; the '
                                f'perception node loads v{info["version"]} (the registry\'s current head) '
                                'when it starts')
            self.get_logger().warning(info['message'])
            cli.remove_pending_request(future)
            future.cancel()

    def _follow_registry(self) -> None:
        """Use the registry's current head (another process, e.g. the perception node's ~/rollback, may
        have moved it), so both nodes agree on the version and rounds start from the deployed head."""
        try:
            current = self.registry.current_version
            if current == self.engine.head.version or self.round_running:
                return
            head = self.registry.load(current)
        except Exception as e:  # an unreadable registry: keep the head in use, say why once in a while
            self.get_logger().warning(f'head registry unreadable, keeping head v{self.engine.head.version}: '
                                      f'{e}', throttle_duration_sec=30.0)
            return
        old = self.engine.swap_head(head)
        self.get_logger().info(f'head registry moved to v{head.version}: following it (was v{old.version})')

    def _on_timer(self) -> None:
        self._check_reload_timeout()
        self._follow_registry()
        self.store.evict_expired()
        period = self._p('adapt_period_s')
        now = time.monotonic()
        if period > 0 and now - self._last_periodic_round >= period:
            self._last_periodic_round = now
            self.start_round('adapt_period_s')
        self._publish_status()
        self._publish_diagnostics()

    def status(self) -> dict:
        try:
            current = self.registry.current_version
        except BundleError:
            current = None
        return {
            'node': self.get_fully_qualified_name(), 'pid': os.getpid(), 'bundle': self.bundle.name,
            'head_version': self.engine.head.version, 'registry_version': current,
            'store': self.store.stats(), 'label_counts': self.store.label_counts(),
            'counters': dict(self.counters), 'bad_frames': dict(self.bad_reasons),
            'bad_labels': dict(self.bad_labels), 'bad_features': dict(self.bad_features),
            'frames_dropped': max(0, self.counters['frames_received'] - self.counters['frames_handled']
                                  - len(self._frames)),
            'memory': {'queued_frames': len(self._frames), 'queued_bytes': self._frames.nbytes,
                       'recent_frames': len(self._recent), 'recent_bytes': self._recent.nbytes,
                       'max_bytes': self._p('memory_max_bytes')},
            # labels that overflowed the queue (a label flood): received - malformed - handled - queued
            'labels_dropped': max(0, self.counters['labels_received'] - self.counters['labels_bad']
                                  - self.counters['labels_handled'] - len(self._labels)),
            'pending_labels': len(self._pending), 'new_since_round': self._since_round,
            'round': {'running': self.round_running, 'pid': self.round_pid, 'count': self.rounds,
                      'last': self.last_round},
            'reload': self.reload, 'teacher': self.teacher, 'teacher_error': self.teacher_error,
        }

    def _publish_status(self) -> None:
        try:
            self.pub_status.publish(String(data=json.dumps(self.status(), default=_json_default)))
        except Exception as e:  # publishing during shutdown
            self.get_logger().debug(f'status not published: {e}')

    def _recent_faults(self, store_dropped: int) -> dict:
        """Fault counts over the last ~WARN_WINDOW_S: a WARN says what is wrong now, not what once was
        (the all-time counts stay in the key/values)."""
        now = time.monotonic()
        cur = {'frames_bad': self.counters['frames_bad'], 'labels_bad': self.counters['labels_bad'],
               'features_bad': self.counters['features_bad'], 'store_dropped': store_dropped}
        hist = self._fault_history
        hist.append((now, cur))
        while len(hist) > 1 and now - hist[1][0] >= WARN_WINDOW_S:
            hist.popleft()
        return {k: v - hist[0][1].get(k, 0) for k, v in cur.items()}

    def _publish_diagnostics(self) -> None:
        s = self.store.stats()
        recent = self._recent_faults(s['dropped'])
        st = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: adaptation',
                              hardware_id=self.bundle.name, level=DiagnosticStatus.OK, message='ok')
        last = self.last_round or {}
        if last.get('failed'):
            st.level, st.message = DiagnosticStatus.WARN, f'last round failed: {last.get("reason")}'
        elif recent['store_dropped']:
            st.level = DiagnosticStatus.WARN
            st.message = (f'{recent["store_dropped"]} frames not stored in the last {WARN_WINDOW_S:.0f} s '
                          f'({s["last_error"]})')
        elif self.teacher_error:
            st.level, st.message = DiagnosticStatus.WARN, self.teacher_error
        elif recent['frames_bad'] or recent['labels_bad'] or recent['features_bad']:
            st.level = DiagnosticStatus.WARN
            st.message = (f'bad input in the last {WARN_WINDOW_S:.0f} s: {recent["frames_bad"]} frames, '
                          f'{recent["labels_bad"]} labels, {recent["features_bad"]} features messages '
                          f'(all time: frames {dict(self.bad_reasons)}, labels {dict(self.bad_labels)})')
        elif self.round_running:
            st.message = 'round running'
        kv = {'head_version': self.engine.head.version, 'store_entries': s['entries'],
              'store_bytes': s['bytes'], 'store_dropped': s['dropped'], 'store_evicted': s['evicted'],
              'store_skipped': sum(s['skipped'].values()),
              'store_skipped_non_finite': s['skipped_non_finite'],
              'round_running': self.round_running, 'rounds': self.rounds,
              'last_round_accepted': last.get('accepted'), 'last_round_reason': last.get('reason'),
              'pending_labels': len(self._pending)}
        teacher = (last.get('metrics') or {}).get('teacher') or {}
        if teacher:  # how the last round's teacher labelled: test_time_norm or plain (and why)
            kv['teacher_mode'] = teacher.get('mode')
            if teacher.get('note'):
                kv['teacher_note'] = teacher['note']
        kv.update({f'labels.{k}': v for k, v in s['labels'].items()})
        kv.update({k: v for k, v in self.counters.items()})
        kv['labels_dropped'] = max(0, self.counters['labels_received'] - self.counters['labels_bad']
                                   - self.counters['labels_handled'] - len(self._labels))
        st.values = [KeyValue(key=k, value=str(v)) for k, v in kv.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        try:
            self.pub_diag.publish(arr)
        except Exception as e:
            self.get_logger().debug(f'diagnostics not published: {e}')

    def destroy_node(self):
        # also called by rclpy.try_shutdown() on a node whose __init__ failed half-way
        if hasattr(self, '_worker'):
            self._stop.set()  # also cancels a running round (its process is killed)
            self._wake.set()
            if self._worker.is_alive():
                self._worker.join(timeout=2.0)
            t = self._round_thread
            if t is not None and t.is_alive():
                t.join(timeout=5.0)
        return super().destroy_node()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def main(args=None) -> int:
    return run_node(AdaptationNode, 'adaptation', args=args)  # executor: its executor_threads parameter


if __name__ == '__main__':
    raise SystemExit(main())
