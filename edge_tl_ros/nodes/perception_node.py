"""perception_node: the student classifier on a camera topic. This is where a frame enters.

Data path (one frame):
  subscription callback -> ``_slot`` (deque of length 1: the newest frame wins, never a backlog)
  -> inference thread -> ``imaging`` (zero-copy view / JPEG decode) -> ``Engine.infer``
  -> ``~/classification`` (vision_msgs/Classification) [+ ``~/features`` in incremental mode]

The subscription callback only stores a reference and sets an event; the inference thread never takes
a lock; a head swap (``~/reload_head``, ``~/rollback``, parameter ``head_version``) validates the new
head in the service thread and then assigns one reference, so the next frame uses it and no frame is
dropped. Frames that arrive while one is being inferred replace the waiting one and are counted as
dropped: ``dropped = received - processed - rejected - waiting`` (exact, without locks).
"""

from __future__ import annotations

import collections
import sys
import threading
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger
from vision_msgs.msg import Classification, ObjectHypothesis

from ..bundle import BundleError, HeadRegistry, default_state_dir, load_bundle, resolve_bundle_path
from ..engine import MODES, PROVIDERS, Engine, EngineError
from ..imaging import DEFAULT_MAX_PIXELS, FrameError, decode_compressed, image_view
from .params import declare_all, run_node

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
    'roi': ([0, 0, 0, 0], dict(text='Region of interest [x, y, width, height] in pixels cropped before '
                                    'inference; width/height 0 = to the image edge.')),
    'publish_debug_image': (False, dict(text='Publish ~/debug_image (label overlay) while someone '
                                             'subscribes.')),
    'head_version': (-1, dict(text='Head version to use (-1 = the head registry\'s current version).',
                              int_range=(-1, 1_000_000))),
    'max_image_pixels': (DEFAULT_MAX_PIXELS, dict(text='Frames with more pixels are rejected.',
                                                  int_range=(1, 100_000_000))),
    'diagnostics_period_s': (1.0, dict(text='Diagnostics publishing period.', float_range=(0.1, 60.0),
                                       read_only=True)),
}


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
        head = None
        if self.mode != 'full':
            want = p('head_version')
            if want >= 0:
                head = self.registry.load(want)
            else:
                head, warn = self.registry.load_current_or_fallback()
                if warn:
                    self.get_logger().warning(warn)
        self.engine = Engine(self.bundle, self.mode, p('num_threads'), p('execution_provider'),
                             use_int8=p('use_int8'), head=head)
        self._top_k = p('top_k')
        self._threshold = p('score_threshold')
        self._roi = self._roi_tuple(p('roi'))
        self._max_pixels = p('max_image_pixels')
        self._debug = p('publish_debug_image')

        # counters (written by one thread each; read for diagnostics)
        self.received = 0
        self.processed = 0
        self.rejected = 0
        self.reject_reasons: collections.Counter = collections.Counter()
        self._lat = np.zeros(LATENCY_WINDOW, np.float64)  # processing latency ring (s)
        self._age = np.zeros(LATENCY_WINDOW, np.float64)  # publish time - header stamp (s)
        self._last_diag = (time.monotonic(), 0, 0)
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
        self._worker = threading.Thread(target=self._run, name='edge_tl_inference', daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'bundle {self.bundle.name} ({self.bundle.root}), mode {self.mode}, provider '
            f'{self.engine.provider}, head v{self.head_version}, input {self.bundle.input_size}')

    # -- parameters --------------------------------------------------------------------------------------
    def _p(self, name):
        return self.get_parameter(name).value

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
                elif prm.name == 'publish_debug_image':
                    updates['_debug'] = bool(prm.value)
                elif prm.name == 'max_image_pixels':
                    updates['_max_pixels'] = int(prm.value)
                elif prm.name == 'head_version':
                    if self.mode == 'full':
                        raise EngineError('deployment_mode full cannot swap heads')
                    v = int(prm.value)
                    updates['_head'] = self.registry.load(None if v < 0 else v)
            except (ValueError, TypeError, BundleError, EngineError) as e:
                return SetParametersResult(successful=False, reason=f'{prm.name}: {e}')
        head = updates.pop('_head', None)
        if head is not None:
            self._swap(head)
        for k, v in updates.items():
            setattr(self, k, v)
        return SetParametersResult(successful=True)

    # -- frame path --------------------------------------------------------------------------------------
    def _on_frame(self, msg) -> None:
        """Subscription callback: keep only the newest frame (no copy, no lock, no log)."""
        self._slot.append((msg, time.monotonic()))
        self.received += 1
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.1):
                continue
            self._wake.clear()
            try:
                msg, t_in = self._slot.popleft()
            except IndexError:
                continue
            self._process(msg, t_in)

    def _process(self, msg, t_in: float) -> None:
        try:
            if isinstance(msg, CompressedImage):
                img, order = decode_compressed(msg.format, msg.data, self._max_pixels)
            else:
                img, order = image_view(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian,
                                        msg.data, self._max_pixels)
            pred = self.engine.infer(img, order, self._roi)
        except FrameError as e:
            self._reject(e.reason, str(e))
            return
        except Exception as e:  # never let one frame kill the inference thread
            self._reject('inference_error', f'{type(e).__name__}: {e}')
            return
        names = pred.head.class_names if pred.head is not None else self.bundle.class_names
        out = Classification()
        out.header = msg.header
        out.results = [ObjectHypothesis(class_id=names[i], score=s)
                       for i, s in pred.topk(self._top_k, self._threshold)] or \
            [ObjectHypothesis(class_id=names[i], score=s) for i, s in pred.topk(1)]
        self.pub_cls.publish(out)
        if self.pub_feat is not None:
            f = pred.features
            self.pub_feat.publish(Image(header=msg.header, height=1, width=f.shape[0], encoding='32FC1',
                                        step=4 * f.shape[0], data=f.astype(np.float32).tobytes()))
        if self._debug and self.pub_debug.get_subscription_count() > 0:
            self._publish_debug(msg, img, order, out)
        now = time.monotonic()
        i = self.processed % LATENCY_WINDOW
        self._lat[i] = now - t_in
        st = msg.header.stamp
        self._age[i] = time.time() - (st.sec + st.nanosec * 1e-9)
        self.processed += 1

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected += 1
        self.reject_reasons[reason] += 1
        self.get_logger().warning(f'dropping frame ({self.rejected} so far): {detail}',
                                  throttle_duration_sec=5.0)

    def _publish_debug(self, msg, img, order, out) -> None:
        import cv2

        from ..imaging import to_order

        vis = to_order(np.ascontiguousarray(img), order, 'bgr').copy()
        top = out.results[0]
        cv2.putText(vis, f'{top.class_id} {top.score:.2f}', (4, max(12, vis.shape[0] // 12)),
                    cv2.FONT_HERSHEY_SIMPLEX, max(0.3, vis.shape[1] / 640), (0, 255, 0), 1, cv2.LINE_AA)
        self.pub_debug.publish(Image(header=msg.header, height=vis.shape[0], width=vis.shape[1],
                                     encoding='bgr8', step=vis.shape[1] * 3, data=vis.tobytes()))

    # -- head swap ---------------------------------------------------------------------------------------
    @property
    def head_version(self) -> int:
        return self.engine.head.version if self.engine.head is not None else 0

    def _swap(self, head) -> None:
        self.engine.swap_head(head)  # validates, then one reference assignment

    def _srv_reload(self, request, response):
        return self._head_service(response, self.registry.load, 'head v{} loaded', 'refused')

    def _srv_rollback(self, request, response):
        return self._head_service(response, self.registry.rollback, 'rolled back to head v{}',
                                  'rollback refused')

    def _head_service(self, response, get_head, ok: str, refused: str):
        """Validate the head ``get_head`` returns, swap it in; on any error keep the current head."""
        if self.mode == 'full':
            response.success, response.message = False, 'deployment_mode full cannot swap heads'
            return response
        try:
            head = get_head()
            self._swap(head)
            response.success, response.message = True, ok.format(head.version)
            self.get_logger().info(response.message)
        except (BundleError, EngineError, OSError) as e:
            response.success = False
            response.message = f'{refused}, keeping head v{self.head_version}: {e}'
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
                'latency_p50_ms': float(np.percentile(lat, 50) * 1e3),
                'latency_p99_ms': float(np.percentile(lat, 99) * 1e3),
                'stamp_age_p50_ms': float(np.percentile(age, 50) * 1e3),
                'head_version': self.head_version, 'provider': self.engine.provider}

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        t0, rin0, out0 = self._last_diag
        dt = max(1e-6, now - t0)
        s = self.stats()
        self._last_diag = (now, s['received'], s['processed'])
        fps_in, fps_out = (s['received'] - rin0) / dt, (s['processed'] - out0) / dt
        st = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: student inference',
                              hardware_id=self.bundle.name)
        st.level = DiagnosticStatus.OK
        st.message = 'ok'
        if s['received'] == 0:
            st.level, st.message = DiagnosticStatus.WARN, 'no frames received yet'
        elif s['rejected'] and s['reject_reasons']:
            st.level, st.message = DiagnosticStatus.WARN, f'rejected frames: {s["reject_reasons"]}'
        kv = {'fps_in': f'{fps_in:.1f}', 'fps_out': f'{fps_out:.1f}', 'frames_in': s['received'],
              'frames_out': s['processed'], 'dropped_frames': s['dropped'], 'rejected_frames': s['rejected'],
              'latency_p50_ms': f'{s["latency_p50_ms"]:.2f}', 'latency_p99_ms': f'{s["latency_p99_ms"]:.2f}',
              'model': self.bundle.name, 'model_path': str(self.bundle.root),
              'head_version': s['head_version'], 'deployment_mode': self.mode,
              'execution_provider': s['provider']}
        for reason, count in sorted(s['reject_reasons'].items()):
            kv[f'rejected.{reason}'] = count
        st.values = [KeyValue(key=k, value=str(v)) for k, v in kv.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(arr)

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
