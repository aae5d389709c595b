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

Several cameras (parameter ``cameras``: names): one process, one model, one inference thread. Each camera
has its own newest-frame slot, input ``<name>/image`` (or its ``camera_topics`` entry), outputs
``~/<name>/classification`` (``features``, ``debug_image``), counters and /diagnostics status; the thread
takes the newest frame of every camera that has one and infers them in one batched ONNX Runtime call
(``Engine.infer_many``). With ``cameras`` empty the node has the single-camera names above.

Lifecycle: ``perception_lifecycle_node`` is the same node as a managed (lifecycle) node: parameters are
declared at construction, ``configure`` loads the bundle, the head and the ONNX Runtime session and creates
the outputs and services, ``activate`` subscribes to the cameras and starts the inference thread,
``deactivate`` unsubscribes and stops it (no inference while inactive), ``cleanup`` releases the model.
``perception_node`` (a plain node) does configure + activate in its constructor.
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
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger
from vision_msgs.msg import Classification, ObjectHypothesis

from ..bundle import BundleError, HeadRegistry, default_state_dir, load_bundle, resolve_bundle_path
from ..engine import MODES, PROVIDERS, Engine, EngineError
from ..imaging import DEFAULT_MAX_PIXELS, FrameError, decode_message
from .diagnostics import ERROR, WARN, diagnostic_array
from .params import declare_all, one_line, run_node, value

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
    'cameras': ([], dict(text='Camera names for several cameras in this one node (one model, batched '
                              'inference): camera <name> reads <name>/image (+ /compressed) and publishes '
                              '~/<name>/classification. [] = one camera on image -> ~/classification.',
                         read_only=True, string_array=True)),
    'camera_topics': ([], dict(text='Input topic of each camera in cameras (same order; [] = <name>/image). '
                                    'Remapping <name>/image works as well.', read_only=True,
                               string_array=True)),
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


class Camera:
    """One camera of the node: its newest-frame slot, its outputs and its counters (each counter is written
    by one thread: ``received`` by the subscription callback, the others by the inference thread)."""

    def __init__(self, name: str, topic: str):
        self.name = name  # '' = the single-camera layout (image -> ~/classification)
        self.topic = topic
        self.out_prefix = f'~/{name}/' if name else '~/'
        self.slot: collections.deque = collections.deque(maxlen=1)
        self.received = 0
        self.processed = 0
        self.rejected = 0
        self.unknown = 0  # processed frames published with no class (best score below min_score)
        self.reject_reasons: collections.Counter = collections.Counter()
        self.publish_errors = 0  # ~/features or ~/debug_image failed after the classification went out
        self.t_last_frame = 0.0
        self.lat = np.zeros(LATENCY_WINDOW, np.float64)  # processing latency ring (s)
        self.age = np.zeros(LATENCY_WINDOW, np.float64)  # publish time - header stamp (s)
        # at the previous diagnostics: time, received, processed, reject reasons, publish errors
        self.last_diag = (time.monotonic(), 0, 0, {}, 0)
        self.pub_cls = self.pub_feat = self.pub_debug = None
        self.subscriptions: list = []

    @property
    def dropped(self) -> int:
        return max(0, self.received - self.processed - self.rejected - len(self.slot))

    def latency_stats(self) -> dict:
        n = min(self.processed, LATENCY_WINDOW)
        lat = self.lat[:n] if n else np.zeros(1)
        age = self.age[:n] if n else np.zeros(1)
        return {'latency_p50_ms': float(np.percentile(lat, 50) * 1e3),
                'latency_p99_ms': float(np.percentile(lat, 99) * 1e3),
                'stamp_age_p50_ms': float(np.percentile(age, 50) * 1e3)}

    def stats(self) -> dict:
        return {'received': self.received, 'processed': self.processed, 'dropped': self.dropped,
                'rejected': self.rejected, 'reject_reasons': dict(self.reject_reasons),
                'unknown': self.unknown, 'publish_errors': self.publish_errors, **self.latency_stats()}


def camera_layout(names: list, topics: list) -> list[tuple[str, str]]:
    """(name, input topic) of each camera from the ``cameras`` / ``camera_topics`` parameters."""
    names = [str(n).strip() for n in names]
    topics = [str(t).strip() for t in topics]
    if not names:
        if topics:
            raise ValueError('camera_topics needs cameras (one name per topic)')
        return [('', 'image')]
    bad = [n for n in names if not n or not all(c.isalnum() or c == '_' for c in n) or n[0].isdigit()]
    if bad:
        raise ValueError(f'camera names must be ROS name tokens (letters, digits, _; not starting with a '
                         f'digit): {bad}')
    if len(set(names)) != len(names):
        raise ValueError(f'camera names must be unique: {names}')
    if topics and len(topics) != len(names):
        raise ValueError(f'camera_topics has {len(topics)} entries for {len(names)} cameras')
    return [(n, (topics[i] if topics and topics[i] else f'{n}/image')) for i, n in enumerate(names)]


class _Perception:
    """Everything of the perception node; :class:`PerceptionNode` (plain) and :class:`PerceptionLifecycleNode`
    (managed) add only when configure / activate happen."""

    # -- construction: parameters only ---------------------------------------------------------------------
    def _declare(self) -> None:
        declare_all(self, PARAMETERS)
        self.engine: Engine | None = None
        self.cameras: list[Camera] = []
        self.active = False
        self.inference_restarts = 0
        self._death: str | None = None  # why the inference thread ended (set by that thread)
        self._worker: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stop.set()
        self._diag_timer = None
        self._own_services: list = []
        self.pub_diag = None
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _p(self, name):
        return value(self, name, PARAMETERS)

    # -- configure: the model, outputs and services ----------------------------------------------------------
    def _configure(self) -> None:
        p = self._p
        layout = camera_layout(p('cameras'), p('camera_topics'))
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
        self._t_configured = time.monotonic()

        self.cameras = [Camera(name, topic) for name, topic in layout]
        for cam in self.cameras:
            cam.pub_cls = self.create_publisher(Classification, cam.out_prefix + 'classification', 10)
            if self.mode == 'incremental':
                cam.pub_feat = self.create_publisher(Image, cam.out_prefix + 'features', 10)
            cam.pub_debug = self.create_publisher(Image, cam.out_prefix + 'debug_image', 1)
        self.pub_diag = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        srv_group = MutuallyExclusiveCallbackGroup()
        self._own_services = [
            self.create_service(Trigger, '~/reload_head', self._srv_reload, callback_group=srv_group),
            self.create_service(Trigger, '~/rollback', self._srv_rollback, callback_group=srv_group)]
        self._diag_timer = self.create_timer(p('diagnostics_period_s'), self._publish_diagnostics,
                                        callback_group=MutuallyExclusiveCallbackGroup())
        cams = ', '.join(f'{c.name}<-{c.topic}' for c in self.cameras) if self.cameras[0].name else 'image'
        self.get_logger().info(
            f'bundle {self.bundle.name} ({self.bundle.root}), mode {self.mode}, provider '
            f'{self.engine.provider}, head v{self.head_version}, input {self.bundle.input_size}, '
            f'camera{"s" if len(self.cameras) > 1 else ""} {cams}')

    def _cleanup(self) -> None:
        """Undo :meth:`_configure` (after :meth:`_deactivate`): outputs, services, timer, the model."""
        self._deactivate()
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        for srv in self._own_services:
            self.destroy_service(srv)
        self._own_services = []
        for cam in self.cameras:
            for pub in (cam.pub_cls, cam.pub_feat, cam.pub_debug):
                if pub is not None:
                    self.destroy_publisher(pub)
        if self.pub_diag is not None:
            self.destroy_publisher(self.pub_diag)
            self.pub_diag = None
        self.cameras = []
        self.engine = None

    # -- activate: subscriptions and the inference thread --------------------------------------------------
    def _activate(self) -> None:
        p = self._p
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p('qos_depth'),
                         durability=DurabilityPolicy.VOLATILE,
                         reliability=(ReliabilityPolicy.RELIABLE if p('qos_reliability') == 'reliable'
                                      else ReliabilityPolicy.BEST_EFFORT))
        in_group = MutuallyExclusiveCallbackGroup()
        for cam in self.cameras:
            callback = self._on_frame if len(self.cameras) == 1 else self._frame_callback(cam)
            cam.subscriptions = [self.create_subscription(Image, cam.topic, callback, qos,
                                                          callback_group=in_group)]
            if p('use_compressed'):
                cam.subscriptions.append(self.create_subscription(
                    CompressedImage, cam.topic + '/compressed', callback, qos, callback_group=in_group))
        self._stop = threading.Event()
        self._start_worker()
        self.active = True

    def _deactivate(self) -> None:
        """No inference while inactive: unsubscribe, stop the thread; a frame still waiting is dropped."""
        self.active = False
        for cam in self.cameras:
            for sub in cam.subscriptions:
                self.destroy_subscription(sub)
            cam.subscriptions = []
        self._stop.set()
        self._wake.set()
        if self._worker is not None and self._worker.is_alive():
            self._worker.join(timeout=2.0)

    # -- what one camera looked like before several (tests and benchmarks read these) ----------------------
    @property
    def _slot(self):
        return self.cameras[0].slot

    @property
    def pub_cls(self):
        return self.cameras[0].pub_cls

    @property
    def pub_feat(self):
        return self.cameras[0].pub_feat

    @property
    def pub_debug(self):
        return self.cameras[0].pub_debug

    def _total(self, attr: str) -> int:
        return sum(getattr(c, attr) for c in self.cameras)

    received = property(lambda self: self._total('received'))
    processed = property(lambda self: self._total('processed'))
    rejected = property(lambda self: self._total('rejected'))
    unknown = property(lambda self: self._total('unknown'))
    publish_errors = property(lambda self: self._total('publish_errors'))
    dropped = property(lambda self: self._total('dropped'))

    @property
    def reject_reasons(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for c in self.cameras:
            total.update(c.reject_reasons)
        return total

    # -- parameters --------------------------------------------------------------------------------------
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
        if self.engine is None:  # lifecycle node not configured: the values are read on configure
            return SetParametersResult(successful=True)
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
        """Subscription callback of the single camera: keep only the newest frame (no copy, lock or log)."""
        t = time.monotonic()
        cam = self.cameras[0]
        cam.slot.append((msg, t))
        cam.t_last_frame = t
        cam.received += 1
        self._wake.set()

    def _frame_callback(self, cam: Camera):
        """The subscription callback of one of several cameras (same as :meth:`_on_frame`)."""
        wake = self._wake

        def on_frame(msg) -> None:
            t = time.monotonic()
            cam.slot.append((msg, t))
            cam.t_last_frame = t
            cam.received += 1
            wake.set()
        return on_frame

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._run, name='edge_tl_inference', daemon=True)
        self._worker.start()
        self._wake.set()  # a frame may already be waiting in a slot

    def _run(self) -> None:
        """The inference thread. It takes the newest frame of every camera that has one: one frame goes
        through :meth:`_process`, several through one batched call (:meth:`_process_batch`). Each frame
        taken is counted once, whatever those raise; only a ``BaseException`` ends the thread (recorded in
        ``_death`` for the supervisor)."""
        stop, cameras = self._stop, self.cameras
        try:
            while not stop.is_set():
                if not self._wake.wait(0.1):
                    continue
                self._wake.clear()
                taken = []
                for cam in cameras:
                    try:
                        taken.append((cam, *cam.slot.popleft()))
                    except IndexError:
                        pass
                if not taken:
                    continue
                done = [c.processed + c.rejected for c, _, _ in taken]  # written by this thread only
                try:
                    if len(taken) == 1:
                        self._process(taken[0][1], taken[0][2], taken[0][0])
                    else:
                        self._process_batch(taken)
                except BaseException as e:
                    for (cam, _, _), d in zip(taken, done):
                        if cam.processed + cam.rejected == d:
                            self._reject(cam, 'inference_error', _why(e))
                    if not isinstance(e, Exception):
                        raise
        except BaseException as e:
            self._death = _why(e)
            try:
                self.get_logger().error(f'inference thread died: {self._death}')
            except Exception:  # logging itself may be gone (shutdown)
                pass

    def _process(self, msg, t_in: float, cam: Camera | None = None) -> None:
        cam = cam or self.cameras[0]
        try:
            img, order = decode_message(msg, self._max_pixels)
            pred = self.engine.infer(img, order, self._roi)  # FrameError non_finite on NaN/Inf
            out = self._classification(cam, msg.header, pred)
        except FrameError as e:
            return self._reject(cam, e.reason, str(e))
        except Exception as e:  # never let one frame kill the inference thread
            return self._reject(cam, 'inference_error', _why(e))
        self._deliver(cam, msg, t_in, img, order, pred, out)

    def _process_batch(self, taken: list) -> None:
        """The newest frames of several cameras: decoded one by one, inferred in one ONNX Runtime call;
        a frame that fails is rejected alone."""
        ok, frames = [], []
        for cam, msg, t_in in taken:
            try:
                img, order = decode_message(msg, self._max_pixels)
            except FrameError as e:
                self._reject(cam, e.reason, str(e))
                continue
            ok.append((cam, msg, t_in, img, order))
            frames.append((img, order, self._roi))
        if not frames:
            return
        try:
            preds = self.engine.infer_many(frames)
        except Exception as e:
            for cam, *_ in ok:
                self._reject(cam, 'inference_error', _why(e))
            return
        for (cam, msg, t_in, img, order), pred in zip(ok, preds):
            if isinstance(pred, FrameError):
                self._reject(cam, pred.reason, str(pred))
                continue
            try:
                out = self._classification(cam, msg.header, pred)
            except FrameError as e:
                self._reject(cam, e.reason, str(e))
                continue
            except Exception as e:
                self._reject(cam, 'inference_error', _why(e))
                continue
            self._deliver(cam, msg, t_in, img, order, pred, out)

    def _deliver(self, cam: Camera, msg, t_in: float, img, order, pred, out) -> None:
        """Publish a frame's classification (+ optional outputs) and count it."""
        try:
            cam.pub_cls.publish(out)
        except Exception as e:
            return self._reject(cam, 'publish_error', _why(e))
        now = time.monotonic()
        i = cam.processed % LATENCY_WINDOW
        cam.lat[i] = now - t_in
        st = msg.header.stamp
        cam.age[i] = time.time() - (st.sec + st.nanosec * 1e-9)
        cam.processed += 1
        if cam.pub_feat is not None:
            self._output(cam, 'features', self._publish_features, cam, msg, pred)
        if self._debug:
            self._output(cam, 'debug_image', self._publish_debug, msg, img, order, out, cam)

    def _resolve_min_score(self, value: float) -> float:
        """``-1``: the bundle's calibrated ``reject.min_score`` (0 when it has none)."""
        if value >= 0:
            return float(value)
        return float((self.bundle.manifest.get('reject') or {}).get('min_score', 0.0))

    def _classification(self, cam: Camera, header, pred) -> Classification:
        names = pred.head.class_names if pred.head is not None else self.bundle.class_names
        out = Classification()
        out.header = header
        if self._min_score > 0 and float(pred.probs.max()) < self._min_score:
            cam.unknown += 1  # no confident class (not a sign the model knows): empty results
            return out
        out.results = [ObjectHypothesis(class_id=names[i], score=s)
                       for i, s in pred.topk(self._top_k, self._threshold)] or \
            [ObjectHypothesis(class_id=names[i], score=s) for i, s in pred.topk(1)]
        if not out.results:  # cannot happen with finite scores (the engine checks): never publish none
            raise FrameError('non_finite', 'no class has a finite score')
        return out

    def _reject(self, cam: Camera, reason: str, detail: str) -> None:
        cam.rejected += 1
        cam.reject_reasons[reason] += 1
        where = f'camera {cam.name}: ' if cam.name else ''
        self.get_logger().warning(f'{where}dropping frame ({cam.rejected} so far): {detail}',
                                  throttle_duration_sec=5.0)

    def _output(self, cam: Camera, topic: str, publish, *args) -> None:
        """An optional output after the classification went out: a failure is counted, never raised."""
        try:
            publish(*args)
        except Exception as e:
            cam.publish_errors += 1
            self.get_logger().warning(f'{cam.out_prefix}{topic} not published ({cam.publish_errors} so far): '
                                      f'{_why(e)}', throttle_duration_sec=5.0)

    def _publish_features(self, cam: Camera, msg, pred) -> None:
        f = pred.features
        cam.pub_feat.publish(Image(header=msg.header, height=1, width=f.shape[0], encoding='32FC1',
                                   step=4 * f.shape[0], data=f.astype(np.float32).tobytes()))

    def _publish_debug(self, msg, img, order, out, cam: Camera | None = None) -> None:
        pub = (cam or self.cameras[0]).pub_debug
        if pub.get_subscription_count() == 0:
            return
        import cv2

        from ..imaging import to_order

        vis = to_order(np.ascontiguousarray(img), order, 'bgr').copy()
        label = f'{out.results[0].class_id} {out.results[0].score:.2f}' if out.results else 'no result'
        cv2.putText(vis, label, (4, max(12, vis.shape[0] // 12)),
                    cv2.FONT_HERSHEY_SIMPLEX, max(0.3, vis.shape[1] / 640), (0, 255, 0), 1, cv2.LINE_AA)
        pub.publish(Image(header=msg.header, height=vis.shape[0], width=vis.shape[1],
                          encoding='bgr8', step=vis.shape[1] * 3, data=vis.tobytes()))

    # -- head swap ---------------------------------------------------------------------------------------
    @property
    def head_version(self) -> int:
        return self.engine.head.version if self.engine is not None and self.engine.head is not None else 0

    @property
    def backbone_version(self) -> int | None:
        """Version whose adapted backbone is in use; None = the bundle's backbone."""
        return self.engine.backbone_version if self.engine is not None else None

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
    def stats(self) -> dict:
        """Totals over the cameras (+ ``cameras``: each camera's own, when there are several)."""
        cams = self.cameras
        if len(cams) == 1:
            lat = cams[0].latency_stats()
        else:  # pooled over every camera's latency window
            lat = Camera('', '').latency_stats()
            windows = [(c.lat[:min(c.processed, LATENCY_WINDOW)], c.age[:min(c.processed, LATENCY_WINDOW)])
                       for c in cams]
            lats = np.concatenate([w[0] for w in windows]) if cams else np.zeros(0)
            if lats.size:
                ages = np.concatenate([w[1] for w in windows])
                lat = {'latency_p50_ms': float(np.percentile(lats, 50) * 1e3),
                       'latency_p99_ms': float(np.percentile(lats, 99) * 1e3),
                       'stamp_age_p50_ms': float(np.percentile(ages, 50) * 1e3)}
        out = {'received': self.received, 'processed': self.processed, 'dropped': self.dropped,
               'rejected': self.rejected, 'reject_reasons': dict(self.reject_reasons),
               'unknown': self.unknown, 'min_score': self._min_score,
               'publish_errors': self.publish_errors, 'inference_restarts': self.inference_restarts, **lat,
               'head_version': self.head_version, 'provider': self.engine.provider,
               'backbone_version': self.backbone_version}
        if len(cams) > 1:
            out['cameras'] = {c.name: c.stats() for c in cams}
        return out

    def _supervise(self) -> str | None:
        """Restart a dead inference thread; returns why it died (None while it is alive)."""
        if self._worker is None or self._worker.is_alive() or self._stop.is_set():
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

    def _camera_problems(self, cam: Camera, now: float) -> tuple[list, dict]:
        """(problems, values) of one camera for the period since its previous report."""
        t0, rin0, out0, reasons0, perr0 = cam.last_diag
        dt = max(1e-6, now - t0)
        s = cam.stats()
        reasons = s['reject_reasons']
        cam.last_diag = (now, s['received'], s['processed'], reasons, s['publish_errors'])
        problems = []
        if not self.active:
            pass  # inactive (lifecycle): no input expected
        elif s['received'] == 0:
            problems.append((WARN, 'no frames received yet'))
        elif self._stale_s > 0 and now - cam.t_last_frame > self._stale_s:
            problems.append((WARN, f'no frames for {now - cam.t_last_frame:.1f} s'))
        recent = {k: n - reasons0.get(k, 0) for k, n in sorted(reasons.items()) if n > reasons0.get(k, 0)}
        if recent:
            problems.append((WARN, f'rejected frames: {recent}'))
        if s['publish_errors'] > perr0:
            problems.append((WARN, f'{s["publish_errors"] - perr0} outputs not published'))
        kv = {'fps_in': f'{(s["received"] - rin0) / dt:.1f}',
              'fps_out': f'{(s["processed"] - out0) / dt:.1f}',
              'frames_in': s['received'], 'frames_out': s['processed'], 'dropped_frames': s['dropped'],
              'rejected_frames': s['rejected'], 'unknown_frames': s['unknown'],
              'latency_p50_ms': f'{s["latency_p50_ms"]:.2f}', 'latency_p99_ms': f'{s["latency_p99_ms"]:.2f}',
              'publish_errors': s['publish_errors'],
              'last_frame_age_s': f'{now - cam.t_last_frame:.1f}' if s['received'] else 'never'}
        for reason, count in sorted(reasons.items()):
            kv[f'rejected.{reason}'] = count
        return problems, kv

    def _diagnostics(self, died: str | None) -> DiagnosticArray:
        """One status for the node (the model, the head, the inference thread; with one camera also its
        frames); with several cameras one more status per camera (``<node>: camera <name>``), and the
        node's level is the worst of them."""
        now = time.monotonic()
        registry, registry_error = self._registry_version()
        problems = []  # (level, text), this period only
        if died is not None:
            problems.append((ERROR, f'inference thread died: {died}'))
        if registry_error is not None:
            problems.append((WARN, f'head registry unreadable: {registry_error}'))
        elif self.mode != 'full' and self._p('head_version') < 0 and registry != self.head_version:
            problems.append((WARN, f'head v{self.head_version} is not the registry\'s '
                                   f'current v{registry} (~/reload_head follows it)'))
        per_camera = [(cam, *self._camera_problems(cam, now)) for cam in self.cameras]
        kv = {}
        extra = []
        if len(per_camera) == 1:
            problems += per_camera[0][1]
            kv.update(per_camera[0][2])
        else:
            for cam, cam_problems, cam_kv in per_camera:
                cam_kv = {'topic': self.resolve_topic_name(cam.topic), **cam_kv}
                extra.append((f'camera {cam.name}', cam_problems, cam_kv))
                problems += [(lvl, f'{cam.name}: {text}') for lvl, text in cam_problems]
            kv.update({'cameras': len(per_camera), 'frames_in': self.received, 'frames_out': self.processed,
                       'dropped_frames': self.dropped, 'rejected_frames': self.rejected})
        s_head = self.head_version
        kv.update({'state': 'active' if self.active else 'inactive',
                   'min_score': f'{self._min_score:.3f}', 'model': self.bundle.name,
                   'model_path': str(self.bundle.root), 'head_version': s_head,
                   'backbone': 'bundle' if self.backbone_version is None else f'v{self.backbone_version}',
                   'registry_version': registry if registry_error is None else 'unreadable',
                   'deployment_mode': self.mode, 'execution_provider': self.engine.provider,
                   'inference_restarts': self.inference_restarts})
        ok = 'ok' if self.active else 'inactive (lifecycle): no inference'
        return diagnostic_array(self, 'student inference', self.bundle.name, problems, kv, ok_message=ok,
                                extra=extra)

    def _shutdown_worker(self) -> None:
        # also called by rclpy.try_shutdown() on a node whose __init__ failed half-way
        if getattr(self, '_worker', None) is not None:
            self._stop.set()
            self._wake.set()
            if self._worker.is_alive():
                self._worker.join(timeout=2.0)


class PerceptionNode(_Perception, Node):
    """Student inference on camera frames; usable in-process (tests, ``edge-tl up``) or via ``main``. A plain
    node: the constructor configures and activates (an error there raises, one clear message)."""

    def __init__(self, node_name: str = 'perception', **kwargs):
        Node.__init__(self, node_name, **kwargs)
        self._declare()
        self._configure()
        self._activate()

    def destroy_node(self):
        self._shutdown_worker()
        return Node.destroy_node(self)


class PerceptionLifecycleNode(_Perception, LifecycleNode):
    """The perception node as a managed node (``ros2 lifecycle set /perception configure|activate|...``)."""

    def __init__(self, node_name: str = 'perception', **kwargs):
        LifecycleNode.__init__(self, node_name, **kwargs)
        self._declare()

    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as e:  # a bad bundle or parameter: this transition fails, the node stays usable
            self.get_logger().error(f'configure failed: {_why(e)}')
            try:
                self._cleanup()
            except Exception:
                pass
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._activate()
        self.get_logger().info('active: inference on')
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._deactivate()
        self.get_logger().info('inactive: inference off')
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._cleanup()
        return super().on_cleanup(state)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._cleanup()
        return super().on_shutdown(state)

    def destroy_node(self):
        self._shutdown_worker()
        return LifecycleNode.destroy_node(self)


def main(args=None) -> int:
    return run_node(PerceptionNode, 'perception', args=args)  # executor: its executor_threads parameter


def lifecycle_main(args=None) -> int:
    return run_node(PerceptionLifecycleNode, 'perception', args=args)


if __name__ == '__main__':
    raise SystemExit(main())
