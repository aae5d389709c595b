"""perception_node: the student classifier on a camera topic. This is where a frame enters.

Data path (one frame):
  subscription callback -> ``_slot`` (deque of length 1: the newest frame wins, never a backlog)
  -> inference thread -> ``imaging`` (zero-copy view / JPEG decode) -> ``Engine.infer`` (NaN/Inf
  features or scores: ``FrameError`` ``non_finite``) -> ``~/classification`` (vision_msgs/Classification)
  [+ ``~/features`` in incremental mode, ``~/debug_image`` while enabled and subscribed]

The subscription callback only stores a reference and sets an event; the inference thread never takes
a lock; a head swap (``~/reload_head``, ``~/rollback``, parameter ``head_version``) validates the new
head in the service thread and then assigns one reference, so the next frame uses it and no frame is
dropped; a head that fails to load for any reason is refused and the current head stays. Frames that
arrive while one is being inferred replace the waiting one and are counted as dropped:
``dropped = received - processed - rejected - waiting`` (exact, without locks). Every frame the thread
takes ends as exactly one of: processed (its classification was published; with an empty ``results``
list, counted in ``unknown``, when its best score is below ``min_score``: no sign the model knows) or
rejected with a reason
(an ``imaging`` reason, ``non_finite``, ``inference_error`` for anything else the frame path raises,
``publish_error`` if the classification could not be published); a failed ``~/features`` or
``~/debug_image`` after that counts in ``publish_errors``.

Supervision: nothing a frame does ends the inference thread (every ``Exception`` is counted per frame).
If it ends anyway (``SystemExit``, ``KeyboardInterrupt``, another ``BaseException``) the diagnostics timer
finds it dead, reports ERROR ``inference thread died: <reason>`` and starts a new one
(``inference_restarts``). /diagnostics levels describe the last period, not the node's whole life:
WARN for frames rejected since the previous report, for no frames for ``stale_input_timeout_s``, and
when the head in use is not the registry's current version; the cumulative counters stay in the values.
"""

from __future__ import annotations

import collections
import sys
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger
from vision_msgs.msg import Classification, ObjectHypothesis

from ..bundle import BundleError, HeadRegistry, default_state_dir, load_bundle, resolve_bundle_path
from ..engine import MODES, PROVIDERS, Engine, EngineError
from ..imaging import DEFAULT_MAX_PIXELS, FrameError, decode_message
from .diagnostics import ERROR, WARN, diagnostic_array
from .params import declare_all, one_line, run_node

LATENCY_WINDOW = 1024


# name -> (default, descriptor kwargs); the single source for README and config/edge_tl.yaml checks
PARAMETERS = {
    'model_bundle': ('', dict(text='Model bundle directory ("" = shipped gtsrb_student; a bare name = '
                                   'a shipped bundle).',
                              read_only=True)),
    'state_dir': ('', dict(text='Directory of adapted head versions, shared with the adaptation node '
                                '("" = $ROS_HOME/edge_tl_ros/<bundle name>).', read_only=True)),
    'deployment_mode': ('feature_extractor', dict(
        text='full: fused model (no head swap); feature_extractor: backbone + swappable head; '
             'incremental: feature_extractor that also publishes ~/features.', read_only=True,
        choices=MODES)),
    'execution_provider': ('cpu', dict(text='ONNX Runtime execution provider (falls back to cpu if the '
                                            'provider is not available).', read_only=True,
                                       choices=tuple(PROVIDERS))),
    'num_threads': (1, dict(text='ONNX Runtime intra-op threads.', read_only=True, int_range=(1, 64))),
    'gil_switch_interval_ms': (0.5, dict(
        text='Python GIL switch interval of this process (sys.setswitchinterval; Python\'s default is 5 ms). '
             'The inference thread re-takes the GIL after every OpenCV / ONNX Runtime call; while the '
             'executor thread deserialises frames each re-take can wait a whole interval. 0 = leave the '
             'interpreter\'s setting.', read_only=True, float_range=(0.0, 100.0))),
    'executor_threads': (1, dict(
        text='Executor threads when run as its own process (perception_node main). 1 = rclpy '
             'SingleThreadedExecutor: the lowest frame latency (rclpy\'s MultiThreadedExecutor adds ~3 ms '
             'per 640x480 frame on 2 cores; inference has its own thread either way); a ~/reload_head '
             'call then delays the next frame by the swap (< 1 ms). > 1 = MultiThreadedExecutor: services '
             'and the diagnostics timer never wait behind a frame callback.', read_only=True,
        int_range=(1, 16))),
    'use_int8': (False, dict(text='Use the bundle\'s int8 backbone if it has one.', read_only=True)),
    'use_compressed': (False, dict(text='Also subscribe image/compressed (JPEG/PNG).', read_only=True)),
    'qos_reliability': ('best_effort', dict(text='Input topic reliability (sensor-data QoS is best_effort).',
                                            read_only=True, choices=('best_effort', 'reliable'))),
    'qos_depth': (1, dict(text='Input topic queue depth (1 = always the newest frame).', read_only=True,
                          int_range=(1, 100))),
    'top_k': (5, dict(text='Number of hypotheses published per frame.', int_range=(1, 100))),
    'score_threshold': (0.0, dict(text='Hypotheses below this score are not published (the best one '
                                       'always is).', float_range=(0.0, 1.0))),
    'min_score': (-1.0, dict(text='Frames whose best score is below this publish no class (empty results); '
                                   '-1 = the bundle\'s calibrated reject threshold, 0 = never.',
                              float_range=(-1.0, 1.0))),
    'roi': ([0, 0, 0, 0], dict(text='Region of interest [x, y, width, height] in pixels cropped before '
                                    'inference; width/height 0 = to the image edge.')),
    'publish_debug_image': (False, dict(text='Publish ~/debug_image (label overlay) while someone '
                                             'subscribes.')),
    'head_version': (-1, dict(text='Head version to use (-1 = the head registry\'s current version). At '
                                   'start-up a version that cannot be loaded falls back like -1 (with a '
                                   'warning); at run time it is refused and the current head stays.',
                              int_range=(-1, 1_000_000))),
    'max_image_pixels': (DEFAULT_MAX_PIXELS, dict(text='Frames with more pixels are rejected.',
                                                  int_range=(1, 100_000_000))),
    'diagnostics_period_s': (1.0, dict(text='Diagnostics publishing period.', float_range=(0.1, 60.0),
                                       read_only=True)),
    'stale_input_timeout_s': (5.0, dict(text='Diagnostics WARN when frames came before but none for this '
                                             'long (0 = off).', float_range=(0.0, 3600.0))),
}


def _why(e: BaseException) -> str:
    """An exception as one bounded log/response line; our own error types need no type name."""
    text = one_line(e)
    if not isinstance(e, (BundleError, EngineError, FrameError)):
        text = f'{type(e).__name__}: {text}'
    return text if len(text) <= 500 else text[:497] + '...'


class PerceptionNode(Node):
    """Student inference on camera frames; usable in-process (tests, ``edge-tl up``) or via ``main``."""

    def __init__(self, node_name: str = 'perception', **kwargs):
        super().__init__(node_name, **kwargs)
        declare_all(self, PARAMETERS)
        p = self._p
        if p('gil_switch_interval_ms') > 0:  # process-wide: the inference thread is what this process is for
            sys.setswitchinterval(p('gil_switch_interval_ms') / 1000.0)
        bundle_path = resolve_bundle_path(p('model_bundle'))
        self.bundle = load_bundle(bundle_path)  # raises BundleError with one clear message
        self.registry = HeadRegistry(self.bundle, p('state_dir') or default_state_dir(self.bundle.name))
        self.mode = p('deployment_mode')
        if self.mode not in MODES:
            raise EngineError(f'deployment_mode {self.mode!r} is not one of {MODES}')
        head, backbone = self._initial_head(p('head_version')) if self.mode != 'full' else (None, None)
        self.engine = self._make_engine(head, backbone)
        from ..engine import PROVIDERS

        want = p('execution_provider')
        if PROVIDERS.get(want) != self.engine.provider:
            self.get_logger().warning(
                f'execution_provider {want!r} is not available in this onnxruntime; running on '
                f'{self.engine.provider} (CUDA needs the onnxruntime-gpu package, TensorRT also TensorRT)')
        self._top_k = p('top_k')
        self._threshold = p('score_threshold')
        self._min_score = self._resolve_min_score(p('min_score'))
        self._roi = self._roi_tuple(p('roi'))
        self._max_pixels = p('max_image_pixels')
        self._debug = p('publish_debug_image')
        self._stale_s = p('stale_input_timeout_s')

        # counters (written by one thread each; read for diagnostics)
        self.received = 0
        self.processed = 0
        self.rejected = 0
        self.unknown = 0  # processed frames published with no class (best score below min_score)
        self.reject_reasons: collections.Counter = collections.Counter()
        self.publish_errors = 0  # ~/features or ~/debug_image failed after the classification went out
        self.inference_restarts = 0
        self._death: str | None = None  # why the inference thread ended (set by that thread)
        self._t_last_frame = 0.0
        self._lat = np.zeros(LATENCY_WINDOW, np.float64)  # processing latency ring (s)
        self._age = np.zeros(LATENCY_WINDOW, np.float64)  # publish time - header stamp (s)
        # at the previous diagnostics: time, received, processed, reject reasons, publish errors
        self._last_diag = (time.monotonic(), 0, 0, {}, 0)
        self._slot: collections.deque = collections.deque(maxlen=1)
        self._wake = threading.Event()
        self._stop = threading.Event()

        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p('qos_depth'),
                         durability=DurabilityPolicy.VOLATILE,
                         reliability=(ReliabilityPolicy.RELIABLE if p('qos_reliability') == 'reliable'
                                      else ReliabilityPolicy.BEST_EFFORT))
        self.pub_cls = self.create_publisher(Classification, '~/classification', 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.pub_feat = self.create_publisher(Image, '~/features', 10) if self.mode == 'incremental' else None
        self.pub_debug = self.create_publisher(Image, '~/debug_image', 1)
        in_group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(Image, 'image', self._on_frame, qos, callback_group=in_group)
        if p('use_compressed'):
            self.create_subscription(CompressedImage, 'image/compressed', self._on_frame, qos,
                                     callback_group=in_group)
        srv_group = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, '~/reload_head', self._srv_reload, callback_group=srv_group)
        self.create_service(Trigger, '~/rollback', self._srv_rollback, callback_group=srv_group)
        self.create_timer(p('diagnostics_period_s'), self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._start_worker()
        self.get_logger().info(
            f'bundle {self.bundle.name} ({self.bundle.root}), mode {self.mode}, provider '
            f'{self.engine.provider}, head v{self.head_version}, input {self.bundle.input_size}')

    # -- parameters --------------------------------------------------------------------------------------
    def _p(self, name):
        return self.get_parameter(name).value

    def _initial_head(self, want: int):
        """(head, adapted backbone or None) of ``head_version`` ``want`` if it loads, else what -1 gives: the
        registry's current version or the last good one before it, else the bundle's; each fallback is
        warned, none refuses to start."""
        if want >= 0:
            try:
                return self.registry.load(want, with_backbone=True)
            except Exception as e:
                self.get_logger().warning(f'head_version {want} cannot be loaded ({_why(e)}); using the '
                                          'registry\'s current head instead')
        try:
            head, backbone, warn = self.registry.load_current_or_fallback(with_backbone=True)
        except Exception as e:  # an index the fallback itself cannot read
            head, backbone = self.bundle.head, None
            warn = f'head registry unusable ({_why(e)}), using the bundle head (v0)'
        if warn:
            self.get_logger().warning(warn)
        return head, backbone

    def _make_engine(self, head, backbone: bytes | None) -> Engine:
        """An engine for ``head`` on the bundle backbone, or on ``backbone`` (its version's adapted one)."""
        p = self._p
        if backbone is not None and p('use_int8'):
            self.get_logger().warning(f'head v{head.version} comes with an adapted fp32 backbone: '
                                      'use_int8 does not apply to it', once=True)
        return Engine(self.bundle, self.mode, p('num_threads'), p('execution_provider'),
                      use_int8=p('use_int8') and backbone is None, head=head, backbone=backbone,
                      backbone_version=head.version if backbone is not None else None)

    @staticmethod
    def _roi_tuple(roi):
        roi = [int(v) for v in roi]
        if len(roi) != 4 or min(roi) < 0:
            raise ValueError('roi must be [x, y, width, height] with non-negative integers')
        return None if roi == [0, 0, 0, 0] else tuple(roi)

    def _on_set_parameters(self, params) -> SetParametersResult:
        updates = {}
        for prm in params:
            try:
                if prm.name == 'roi':
                    updates['_roi'] = self._roi_tuple(prm.value)
                elif prm.name == 'top_k':
                    updates['_top_k'] = int(prm.value)
                elif prm.name == 'score_threshold':
                    updates['_threshold'] = float(prm.value)
                elif prm.name == 'min_score':
                    updates['_min_score'] = self._resolve_min_score(float(prm.value))
                elif prm.name == 'publish_debug_image':
                    updates['_debug'] = bool(prm.value)
                elif prm.name == 'max_image_pixels':
                    updates['_max_pixels'] = int(prm.value)
                elif prm.name == 'stale_input_timeout_s':
                    updates['_stale_s'] = float(prm.value)
                elif prm.name == 'head_version':
                    if self.mode == 'full':
                        raise EngineError('deployment_mode full cannot swap heads')
                    v = int(prm.value)
                    updates['_head'] = self.registry.load(None if v < 0 else v, with_backbone=True)
            except Exception as e:  # whatever a malformed registry raises: refuse, keep the current head
                reason = f'{prm.name}: {_why(e)}'
                self.get_logger().error(f'parameter refused: {reason}')
                return SetParametersResult(successful=False, reason=reason)
        pair = updates.pop('_head', None)
        if pair is not None:
            try:
                self._swap(*pair)
            except Exception as e:
                return SetParametersResult(successful=False, reason=f'head_version: {_why(e)}')
        for k, v in updates.items():
            setattr(self, k, v)
        return SetParametersResult(successful=True)

    # -- frame path --------------------------------------------------------------------------------------
    def _on_frame(self, msg) -> None:
        """Subscription callback: keep only the newest frame (no copy, no lock, no log)."""
        t = time.monotonic()
        self._slot.append((msg, t))
        self._t_last_frame = t
        self.received += 1
        self._wake.set()

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._run, name='edge_tl_inference', daemon=True)
        self._worker.start()
        self._wake.set()  # a frame may already be waiting in the slot

    def _run(self) -> None:
        """The inference thread. Each frame taken is counted once, whatever ``_process`` raises; only a
        ``BaseException`` ends the thread (recorded in ``_death`` for the supervisor)."""
        try:
            while not self._stop.is_set():
                if not self._wake.wait(0.1):
                    continue
                self._wake.clear()
                try:
                    msg, t_in = self._slot.popleft()
                except IndexError:
                    continue
                done = self.processed + self.rejected  # both written by this thread only
                try:
                    self._process(msg, t_in)
                except BaseException as e:
                    if self.processed + self.rejected == done:
                        self._reject('inference_error', _why(e))
                    if not isinstance(e, Exception):
                        raise
        except BaseException as e:
            self._death = _why(e)
            try:
                self.get_logger().error(f'inference thread died: {self._death}')
            except Exception:  # logging itself may be gone (shutdown)
                pass

    def _process(self, msg, t_in: float) -> None:
        try:
            img, order = decode_message(msg, self._max_pixels)
            pred = self.engine.infer(img, order, self._roi)  # FrameError non_finite on NaN/Inf
            out = self._classification(msg.header, pred)
        except FrameError as e:
            return self._reject(e.reason, str(e))
        except Exception as e:  # never let one frame kill the inference thread
            return self._reject('inference_error', _why(e))
        try:
            self.pub_cls.publish(out)
        except Exception as e:
            return self._reject('publish_error', _why(e))
        now = time.monotonic()
        i = self.processed % LATENCY_WINDOW
        self._lat[i] = now - t_in
        st = msg.header.stamp
        self._age[i] = time.time() - (st.sec + st.nanosec * 1e-9)
        self.processed += 1
        if self.pub_feat is not None:
            self._output('~/features', self._publish_features, msg, pred)
        if self._debug:
            self._output('~/debug_image', self._publish_debug, msg, img, order, out)

    def _resolve_min_score(self, value: float) -> float:
        """``-1``: the bundle's calibrated ``reject.min_score`` (0 when it has none)."""
        if value >= 0:
            return float(value)
        return float((self.bundle.manifest.get('reject') or {}).get('min_score', 0.0))

    def _classification(self, header, pred) -> Classification:
        names = pred.head.class_names if pred.head is not None else self.bundle.class_names
        out = Classification()
        out.header = header
        if self._min_score > 0 and float(pred.probs.max()) < self._min_score:
            self.unknown += 1  # no confident class (not a sign the model knows): empty results
            return out
        out.results = [ObjectHypothesis(class_id=names[i], score=s)
                       for i, s in pred.topk(self._top_k, self._threshold)] or \
            [ObjectHypothesis(class_id=names[i], score=s) for i, s in pred.topk(1)]
        if not out.results:  # cannot happen with finite scores (the engine checks): never publish none
            raise FrameError('non_finite', 'no class has a finite score')
        return out

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected += 1
        self.reject_reasons[reason] += 1
        self.get_logger().warning(f'dropping frame ({self.rejected} so far): {detail}',
                                  throttle_duration_sec=5.0)

    def _output(self, topic: str, publish, *args) -> None:
        """An optional output after the classification went out: a failure is counted, never raised."""
        try:
            publish(*args)
        except Exception as e:
            self.publish_errors += 1
            self.get_logger().warning(f'{topic} not published ({self.publish_errors} so far): {_why(e)}',
                                      throttle_duration_sec=5.0)

    def _publish_features(self, msg, pred) -> None:
        f = pred.features
        self.pub_feat.publish(Image(header=msg.header, height=1, width=f.shape[0], encoding='32FC1',
                                    step=4 * f.shape[0], data=f.astype(np.float32).tobytes()))

    def _publish_debug(self, msg, img, order, out) -> None:
        if self.pub_debug.get_subscription_count() == 0:
            return
        import cv2

        from ..imaging import to_order

        vis = to_order(np.ascontiguousarray(img), order, 'bgr').copy()
        label = f'{out.results[0].class_id} {out.results[0].score:.2f}' if out.results else 'no result'
        cv2.putText(vis, label, (4, max(12, vis.shape[0] // 12)),
                    cv2.FONT_HERSHEY_SIMPLEX, max(0.3, vis.shape[1] / 640), (0, 255, 0), 1, cv2.LINE_AA)
        self.pub_debug.publish(Image(header=msg.header, height=vis.shape[0], width=vis.shape[1],
                                     encoding='bgr8', step=vis.shape[1] * 3, data=vis.tobytes()))

    # -- head swap ---------------------------------------------------------------------------------------
    @property
    def head_version(self) -> int:
        return self.engine.head.version if self.engine.head is not None else 0

    @property
    def backbone_version(self) -> int | None:
        """Version whose adapted backbone is in use; None = the bundle's backbone."""
        return self.engine.backbone_version

    def _swap(self, head, backbone: bytes | None = None) -> None:
        """Make (head, backbone) the pair the next frame uses. Same backbone: the head reference is swapped
        (validated first). Another backbone: a new engine (ORT session, validated on a test input) is built
        here, off the inference thread, which keeps running frames on the old one; then one reference
        assignment hands the next frame the new engine with its head."""
        same = backbone is None and self.engine.backbone_version is None
        if same:
            self.engine.swap_head(head)
            return
        self.engine = self._make_engine(head, backbone)

    def _srv_reload(self, request, response):
        return self._head_service(response, lambda: self.registry.load(with_backbone=True), 'head v{} loaded',
                                  'refused')

    def _srv_rollback(self, request, response):
        return self._head_service(response, lambda: self.registry.rollback(with_backbone=True),
                                  'rolled back to head v{}', 'rollback refused')

    def _head_service(self, response, get_head, ok: str, refused: str):
        """Validate the head ``get_head`` returns, swap it in; on any error keep the current head."""
        if self.mode == 'full':
            response.success, response.message = False, 'deployment_mode full cannot swap heads'
            return response
        try:
            head, backbone = get_head()
            self._swap(head, backbone)
            response.success, response.message = True, ok.format(head.version)
            if backbone is not None:
                response.message += ' with its adapted backbone'
            self.get_logger().info(response.message)
        except Exception as e:  # whatever a malformed index or head file raises: the service answers
            response.success = False
            response.message = f'{refused}, keeping head v{self.head_version}: {_why(e)}'
            self.get_logger().error(response.message)
        return response

    # -- diagnostics ---------------------------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        return max(0, self.received - self.processed - self.rejected - len(self._slot))

    def stats(self) -> dict:
        n = min(self.processed, LATENCY_WINDOW)
        lat = self._lat[:n] if n else np.zeros(1)
        age = self._age[:n] if n else np.zeros(1)
        return {'received': self.received, 'processed': self.processed, 'dropped': self.dropped,
                'rejected': self.rejected, 'reject_reasons': dict(self.reject_reasons),
                'unknown': self.unknown, 'min_score': self._min_score,
                'publish_errors': self.publish_errors, 'inference_restarts': self.inference_restarts,
                'latency_p50_ms': float(np.percentile(lat, 50) * 1e3),
                'latency_p99_ms': float(np.percentile(lat, 99) * 1e3),
                'stamp_age_p50_ms': float(np.percentile(age, 50) * 1e3),
                'head_version': self.head_version, 'provider': self.engine.provider,
                'backbone_version': self.backbone_version}

    def _supervise(self) -> str | None:
        """Restart a dead inference thread; returns why it died (None while it is alive)."""
        if self._worker.is_alive() or self._stop.is_set():
            return None
        why, self._death = self._death or 'it returned without an error', None
        self.inference_restarts += 1
        self.get_logger().error(f'inference thread died: {why}; restarting it '
                                f'(restart {self.inference_restarts})')
        self._start_worker()
        return why

    def _registry_version(self) -> tuple[int | None, str | None]:
        try:
            return self.registry.current_version, None
        except Exception as e:
            return None, _why(e)

    def _publish_diagnostics(self) -> None:
        """Timer: supervise the inference thread, then publish; an error here never stops the executor."""
        died = None
        try:
            died = self._supervise()
        except Exception as e:
            died = f'cannot restart it: {_why(e)}'
        try:
            self.pub_diag.publish(self._diagnostics(died))
        except Exception as e:
            self.get_logger().error(f'diagnostics not published: {_why(e)}', throttle_duration_sec=5.0)

    def _diagnostics(self, died: str | None) -> DiagnosticArray:
        now = time.monotonic()
        t0, rin0, out0, reasons0, perr0 = self._last_diag
        dt = max(1e-6, now - t0)
        s = self.stats()
        reasons = s['reject_reasons']
        self._last_diag = (now, s['received'], s['processed'], reasons, s['publish_errors'])
        fps_in, fps_out = (s['received'] - rin0) / dt, (s['processed'] - out0) / dt
        registry, registry_error = self._registry_version()
        problems = []  # (level, text), this period only
        if died is not None:
            problems.append((ERROR, f'inference thread died: {died}'))
        if s['received'] == 0:
            problems.append((WARN, 'no frames received yet'))
        elif self._stale_s > 0 and now - self._t_last_frame > self._stale_s:
            problems.append((WARN, f'no frames for {now - self._t_last_frame:.1f} s'))
        recent = {k: n - reasons0.get(k, 0) for k, n in sorted(reasons.items()) if n > reasons0.get(k, 0)}
        if recent:
            problems.append((WARN, f'rejected frames: {recent}'))
        if s['publish_errors'] > perr0:
            problems.append((WARN, f'{s["publish_errors"] - perr0} outputs not published'))
        if registry_error is not None:
            problems.append((WARN, f'head registry unreadable: {registry_error}'))
        elif self.mode != 'full' and self._p('head_version') < 0 and registry != s['head_version']:
            problems.append((WARN, f'head v{s["head_version"]} is not the registry\'s '
                                                    f'current v{registry} (~/reload_head follows it)'))
        kv = {'fps_in': f'{fps_in:.1f}', 'fps_out': f'{fps_out:.1f}', 'frames_in': s['received'],
              'frames_out': s['processed'], 'dropped_frames': s['dropped'], 'rejected_frames': s['rejected'],
              'unknown_frames': s['unknown'], 'min_score': f'{s["min_score"]:.3f}',
              'latency_p50_ms': f'{s["latency_p50_ms"]:.2f}', 'latency_p99_ms': f'{s["latency_p99_ms"]:.2f}',
              'model': self.bundle.name, 'model_path': str(self.bundle.root),
              'head_version': s['head_version'],
              'backbone': 'bundle' if s['backbone_version'] is None else f'v{s["backbone_version"]}',
              'registry_version': registry if registry_error is None else 'unreadable',
              'deployment_mode': self.mode, 'execution_provider': s['provider'],
              'publish_errors': s['publish_errors'], 'inference_restarts': s['inference_restarts'],
              'last_frame_age_s': f'{now - self._t_last_frame:.1f}' if s['received'] else 'never'}
        for reason, count in sorted(reasons.items()):
            kv[f'rejected.{reason}'] = count
        return diagnostic_array(self, 'student inference', self.bundle.name, problems, kv)

    def destroy_node(self):
        # also called by rclpy.try_shutdown() on a node whose __init__ failed half-way
        if hasattr(self, '_worker'):
            self._stop.set()
            self._wake.set()
            if self._worker.is_alive():
                self._worker.join(timeout=2.0)
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(PerceptionNode, 'perception', args=args)  # executor: its executor_threads parameter


if __name__ == '__main__':
    raise SystemExit(main())
