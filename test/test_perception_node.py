"""perception_node with real rclpy (Fast DDS), a real ONNX Runtime session and a real toy bundle."""

import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from vision_msgs.msg import Classification  # noqa: E402

from edge_tl_ros.bundle import Head, HeadRegistry, load_bundle  # noqa: E402
from edge_tl_ros.imaging import encode_compressed, image_fields  # noqa: E402
from edge_tl_ros.nodes.params import make_executor  # noqa: E402
from edge_tl_ros.nodes.perception_node import PerceptionNode  # noqa: E402
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_head  # noqa: E402

COLOURS = {'red': (220, 30, 30), 'green': (30, 220, 30), 'blue': (30, 30, 220)}


def frame(name, h=24, w=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = COLOURS[name]
    return img  # RGB


class Harness:
    """A perception node plus a test node (publishers, subscribers, service clients) on one executor."""

    def __init__(self, ctx, bundle, state_dir, executor=None, **params):
        overrides = [Parameter('model_bundle', value=str(bundle)),
                     Parameter('state_dir', value=str(state_dir)),
                     Parameter('qos_reliability', value='reliable')]
        overrides += [Parameter(k, value=v) for k, v in params.items()]
        self.node = PerceptionNode(context=ctx, parameter_overrides=overrides)
        self.io = rclpy.create_node('test_io', context=ctx)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub = self.io.create_publisher(Image, 'image', qos)
        self.pub_c = self.io.create_publisher(CompressedImage, 'image/compressed', qos)
        self.results = []
        self.got = threading.Event()
        self.io.create_subscription(Classification, '/perception/classification', self._on_cls, 50)
        self.features = []
        self.io.create_subscription(Image, '/perception/features', self.features.append, 50)
        self.reload = self.io.create_client(Trigger, '/perception/reload_head')
        self.rollback = self.io.create_client(Trigger, '/perception/rollback')
        # executor='main': the executor perception_node.main would spin the node on (executor_threads)
        self.ex = (make_executor(self.node, context=ctx) if executor == 'main'
                   else MultiThreadedExecutor(num_threads=4, context=ctx))
        self.ex.add_node(self.node)
        self.ex.add_node(self.io)
        self.thread = threading.Thread(target=self.ex.spin, daemon=True)
        self.thread.start()
        self._stamp = 0
        deadline = time.monotonic() + 10
        while self.pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        while self.io.count_publishers('/perception/classification') == 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    def _on_cls(self, msg):
        self.results.append(msg)
        self.got.set()

    def next_stamp(self):
        self._stamp += 1
        return self._stamp

    def image_msg(self, img_rgb, encoding='rgb8'):
        conv = {'rgb8': img_rgb, 'bgr8': img_rgb[..., ::-1],
                'rgba8': np.dstack([img_rgb, np.full(img_rgb.shape[:2], 255, np.uint8)]),
                'bgra8': np.dstack([img_rgb[..., ::-1], np.full(img_rgb.shape[:2], 255, np.uint8)]),
                'mono8': img_rgb.mean(axis=2).astype(np.uint8)}
        msg = Image(**image_fields(conv[encoding], encoding))
        msg.header.stamp.sec = self.next_stamp()
        msg.header.frame_id = 'cam'
        return msg

    def send(self, msg, timeout=5.0):
        """Publish one frame and wait for the classification carrying its stamp."""
        stamp = msg.header.stamp.sec
        (self.pub_c if isinstance(msg, CompressedImage) else self.pub).publish(msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.results:
                if r.header.stamp.sec == stamp:
                    return r
            self.got.wait(0.05)
            self.got.clear()
        return None

    def classify(self, name, encoding='rgb8'):
        r = self.send(self.image_msg(frame(name), encoding))
        assert r is not None, 'no classification received'
        return r.results[0].class_id

    def call(self, client, timeout=5.0):
        assert client.wait_for_service(timeout_sec=timeout)
        fut = client.call_async(Trigger.Request())
        deadline = time.monotonic() + timeout
        while not fut.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        return fut.result()

    def close(self):
        self.ex.shutdown(timeout_sec=2)
        self.node.destroy_node()
        self.io.destroy_node()


@pytest.fixture
def bundle_dir(tmp_path):
    return make_toy_bundle(tmp_path / 'toy')


@pytest.fixture
def harness(ros_context, bundle_dir, tmp_path):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state')
    yield h
    h.close()


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_classifies_each_colour_encoding(harness, encoding):
    for name in TOY_CLASSES:
        msg = harness.image_msg(frame(name), encoding)
        r = harness.send(msg)
        assert r is not None
        assert r.header.stamp == msg.header.stamp and r.header.frame_id == 'cam'
        assert r.results[0].class_id == name
        assert len(r.results) == 3 and r.results[0].score > 0.9
        assert all(a.score >= b.score for a, b in zip(r.results, r.results[1:]))


def test_mono8_and_step_padding(harness):
    img = np.full((20, 30), 128, np.uint8)
    msg = Image(height=20, width=30, encoding='mono8', step=40,
                data=np.pad(img, ((0, 0), (0, 10)), constant_values=7).tobytes())
    msg.header.stamp.sec = harness.next_stamp()
    r = harness.send(msg)
    assert r is not None and r.results[0].class_id in TOY_CLASSES
    # padded rows: the 7s in the padding must not leak into the image (grey, so all scores close)
    assert r.results[0].score < 0.9
    # a padded rgb8 frame classifies like an unpadded one
    rgb = frame('blue', 10, 10)
    padded = np.zeros((10, 10 * 3 + 6), np.uint8)
    padded[:, :30] = rgb.reshape(10, 30)
    padded[:, 30:] = 255  # white padding would turn the frame grey if it were read as pixels
    msg = Image(height=10, width=10, encoding='rgb8', step=36, data=padded.tobytes())
    msg.header.stamp.sec = harness.next_stamp()
    r = harness.send(msg)
    assert r.results[0].class_id == 'blue' and r.results[0].score > 0.9


@pytest.mark.parametrize('fmt', ['jpeg', 'png'])
def test_compressed(ros_context, bundle_dir, tmp_path, fmt):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', use_compressed=True)
    try:
        for name in TOY_CLASSES:
            msg = CompressedImage(format=fmt, data=encode_compressed(frame(name), 'rgb', fmt))
            msg.header.stamp.sec = h.next_stamp()
            r = h.send(msg)
            assert r is not None and r.results[0].class_id == name
    finally:
        h.close()


def test_bad_frames_are_counted_and_node_keeps_serving(ros_context, bundle_dir, tmp_path):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', use_compressed=True)
    try:
        bad = [
            Image(height=4, width=4, encoding='32FC1', step=16, data=bytes(64)),
            Image(height=0, width=0, encoding='rgb8', step=0, data=b''),
            Image(height=4, width=4, encoding='rgb8', step=8, data=bytes(32)),  # step < width*3
            Image(height=4, width=4, encoding='rgb8', step=12, data=bytes(20)),  # data too short
            CompressedImage(format='jpeg', data=encode_compressed(frame('red'), 'rgb')[:40]),
            CompressedImage(format='jpeg', data=b'\xff\xd8\xff' + bytes(100)),
            CompressedImage(format='jpeg', data=encode_compressed(frame('red'), 'rgb', 'png')),
        ]
        for m in bad:
            m.header.stamp.sec = h.next_stamp()
            (h.pub_c if isinstance(m, CompressedImage) else h.pub).publish(m)
            time.sleep(0.05)
            assert h.classify('green') == 'green'  # keeps serving the next valid frame
        deadline = time.monotonic() + 5
        while h.node.rejected < len(bad) and time.monotonic() < deadline:
            time.sleep(0.02)
        s = h.node.stats()
        assert s['rejected'] == len(bad)
        assert s['reject_reasons'] == {'unsupported_encoding': 1, 'empty_image': 1, 'bad_step': 1,
                                       'short_data': 1, 'corrupt_compressed': 2, 'format_mismatch': 1}
    finally:
        h.close()


def test_burst_drops_old_frames_and_builds_no_backlog(ros_context, bundle_dir, tmp_path):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', qos_depth=1)
    try:
        # a model slower than the camera (20 ms per frame) makes the burst certain to outrun inference
        infer = h.node.engine.infer
        h.node.engine.infer = lambda *a, **k: (time.sleep(0.02), infer(*a, **k))[1]
        big = np.ascontiguousarray(np.broadcast_to(np.array(COLOURS['red'], np.uint8), (480, 640, 3)))
        n = 150
        msgs = [h.image_msg(big) for _ in range(n)]
        for m in msgs:
            h.pub.publish(m)
        last = msgs[-1].header.stamp.sec
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r.header.stamp.sec == last for r in h.results):
            time.sleep(0.02)
        assert any(r.header.stamp.sec == last for r in h.results), 'newest frame never classified'
        time.sleep(0.3)
        s = h.node.stats()
        assert s['received'] <= n
        assert s['processed'] + s['dropped'] + s['rejected'] == s['received']
        assert s['dropped'] > 0, s
        assert len(h.results) == s['processed'] < n
        stamps = [r.header.stamp.sec for r in h.results]
        assert stamps == sorted(stamps)  # newest-first: never an old frame after a newer one
    finally:
        h.close()


def test_reload_rollback_and_bad_head(harness, bundle_dir, tmp_path):
    assert harness.classify('red') == 'red'
    reg = HeadRegistry(load_bundle(bundle_dir), tmp_path / 'state')
    reg.add(toy_head(permute=(2, 0, 1)))  # red frames -> 'green' under this head
    res = harness.call(harness.reload)
    assert res.success, res.message
    assert harness.node.head_version == 1
    assert harness.classify('red') == 'green'  # the very next frame uses the new head
    # a registered head whose file is then corrupted on disk is refused; the current head stays
    reg.add(Head(np.ones((3, 8), np.float32), np.zeros(3, np.float32), TOY_CLASSES))
    (reg.dir / 'head_v2.npz').write_bytes(b'not a head at all')
    res = harness.call(harness.reload)
    assert not res.success and 'keeping head v1' in res.message
    assert harness.classify('red') == 'green'
    # rollback: v2 (current in the registry) -> v1; then v1 -> v0 restores the original output
    assert harness.call(harness.rollback).success
    assert harness.call(harness.rollback).success
    assert harness.node.head_version == 0
    assert harness.classify('red') == 'red'
    res = harness.call(harness.rollback)
    assert not res.success and 'nothing to roll back' in res.message


def test_parameters_validated(harness, bundle_dir, tmp_path):
    node = harness.node
    bad = [Parameter('top_k', value=0), Parameter('score_threshold', value=1.5),
           Parameter('head_version', value=7), Parameter('roi', value=[1, 2, 3]),
           Parameter('deployment_mode', value='full'), Parameter('top_k', value='three')]
    for prm in bad:
        try:
            res = node.set_parameters([prm])[0]
            assert not res.successful, prm.name
        except Exception as e:  # rclpy raises for a type change / read-only parameter
            assert type(e).__name__ in ('InvalidParameterTypeException', 'ParameterImmutableException'), e
    assert node.get_parameter('top_k').value == 5 and node.get_parameter('head_version').value == -1
    assert node.set_parameters([Parameter('top_k', value=1)])[0].successful
    r = harness.send(harness.image_msg(frame('blue')))
    assert len(r.results) == 1 and r.results[0].class_id == 'blue'
    # head_version selects a registered version at run time
    HeadRegistry(load_bundle(bundle_dir), tmp_path / 'state').add(toy_head(permute=(1, 2, 0)))
    assert node.set_parameters([Parameter('head_version', value=1)])[0].successful
    assert harness.classify('blue') == 'green'
    # roi crops before inference: a frame that is blue on the left half and red on the right
    img = frame('red', 20, 40)
    img[:, :20] = COLOURS['blue']
    assert node.set_parameters([Parameter('head_version', value=0),
                                Parameter('roi', value=[0, 0, 20, 20])])[0].successful
    assert harness.send(harness.image_msg(img)).results[0].class_id == 'blue'
    assert node.set_parameters([Parameter('roi', value=[20, 0, 0, 0])])[0].successful
    assert harness.send(harness.image_msg(img)).results[0].class_id == 'red'


def test_full_mode_and_incremental_features(ros_context, bundle_dir, tmp_path):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', deployment_mode='full')
    try:
        assert h.classify('green') == 'green'
        res = h.call(h.reload)
        assert not res.success and 'full' in res.message
    finally:
        h.close()
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', deployment_mode='incremental')
    try:
        msg = h.image_msg(frame('blue'))
        assert h.send(msg).results[0].class_id == 'blue'
        deadline = time.monotonic() + 3
        while not h.features and time.monotonic() < deadline:
            time.sleep(0.02)
        f = h.features[-1]
        assert f.encoding == '32FC1' and f.height == 1 and f.width == 8
        assert f.header.stamp == msg.header.stamp
        vec = np.frombuffer(bytes(f.data), np.float32)
        assert vec[2] > 0.7 and vec[0] < 0.2  # the toy backbone's blue channel feature
    finally:
        h.close()


def test_diagnostics(harness):
    from diagnostic_msgs.msg import DiagnosticArray

    got = []
    harness.io.create_subscription(DiagnosticArray, '/diagnostics', got.append, 10)
    for _ in range(3):
        harness.classify('red')
    deadline = time.monotonic() + 4
    while not any(s.values and dict((kv.key, kv.value) for kv in s.values).get('frames_out') not in
                  (None, '0') for a in got for s in a.status) and time.monotonic() < deadline:
        time.sleep(0.05)
    kv = {k.key: k.value for a in got for s in a.status for k in s.values}
    for key in ('fps_in', 'fps_out', 'dropped_frames', 'latency_p50_ms', 'latency_p99_ms', 'head_version',
                'execution_provider', 'model'):
        assert key in kv, key
    assert int(kv['frames_out']) >= 1 and kv['model'] == 'toy'
    assert kv['execution_provider'] == 'CPUExecutionProvider'


def test_missing_or_bad_bundle_fails_with_clear_message(ros_context, tmp_path):
    from edge_tl_ros.bundle import BundleError

    with pytest.raises(BundleError, match='not found'):
        PerceptionNode(context=ros_context, parameter_overrides=[
            Parameter('model_bundle', value=str(tmp_path / 'nope'))])


def test_perception_path_imports_no_torch(bundle_dir, python_without):
    """The robot runtime set has no torch: the node module and the engine must not need it (nor onnx)."""
    out = python_without(('torch', 'torchvision', 'onnx'), (
        'import edge_tl_ros.nodes.perception_node, edge_tl_ros.engine as e, edge_tl_ros.bundle as b\n'
        'import numpy as np\n'
        f'eng = e.Engine(b.load_bundle({str(bundle_dir)!r}))\n'
        'img = np.zeros((8, 8, 3), np.uint8); img[..., 2] = 200\n'
        'print(eng.infer(img, "rgb").topk(1)[0][0])\n'))
    assert out.strip().endswith('2')


def test_gil_switch_interval_parameter(ros_context, bundle_dir, tmp_path):
    """The node shortens the process's GIL switch interval (default 0.5 ms); 0 leaves it alone."""
    import sys

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        h = Harness(ros_context, bundle_dir, tmp_path / 's1', gil_switch_interval_ms=0.0)
        h.close()
        assert sys.getswitchinterval() == pytest.approx(0.005)
        h = Harness(ros_context, bundle_dir, tmp_path / 's2')
        try:
            assert sys.getswitchinterval() == pytest.approx(0.0005)
            assert h.classify('red') == 'red'
        finally:
            h.close()
    finally:
        sys.setswitchinterval(before)


def test_executor_threads_parameter_and_the_node_on_one_thread(ros_context, bundle_dir, tmp_path):
    """main() spins the node on a SingleThreadedExecutor by default (lowest latency); frames, the head
    services and diagnostics all work on that one thread; executor_threads > 1 gives a multi-threaded one."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    h = Harness(ros_context, bundle_dir, tmp_path / 's', executor='main')
    try:
        assert type(h.ex) is SingleThreadedExecutor
        diags = []
        h.io.create_subscription(DiagnosticArray, '/diagnostics', diags.append, 10)
        assert h.classify('red') == 'red'
        HeadRegistry(load_bundle(bundle_dir), tmp_path / 's').add(toy_head(permute=(2, 0, 1)))
        res = h.call(h.reload)
        assert res.success, res.message
        assert h.classify('red') == 'green'
        assert h.call(h.rollback).success and h.classify('red') == 'red'
        deadline = time.monotonic() + 5
        while not diags and time.monotonic() < deadline:
            time.sleep(0.05)
        assert diags, 'no /diagnostics on the single-threaded executor'
    finally:
        h.close()
    node = PerceptionNode(context=ros_context, parameter_overrides=[
        Parameter('model_bundle', value=str(bundle_dir)), Parameter('state_dir', value=str(tmp_path / 't')),
        Parameter('executor_threads', value=3)])
    try:
        assert type(make_executor(node, context=ros_context)) is MultiThreadedExecutor
    finally:
        node.destroy_node()
    plain = rclpy.create_node('no_such_parameter', context=ros_context)  # e.g. the adaptation node
    try:
        assert type(make_executor(plain, 1, context=ros_context)) is SingleThreadedExecutor
        assert type(make_executor(plain, 4, context=ros_context)) is MultiThreadedExecutor
    finally:
        plain.destroy_node()


# -- hardening: non-finite outputs, a supervised inference thread, malformed registries, diagnostics -----
def wait_for(cond, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


class DiagWatch:
    """The perception node's /diagnostics status as (level, message, values), received over DDS."""

    def __init__(self, harness):
        from diagnostic_msgs.msg import DiagnosticArray

        self.seen = []
        harness.io.create_subscription(DiagnosticArray, '/diagnostics', self._on, 50)

    def _on(self, arr):
        for st in arr.status:
            if 'perception' in st.name:
                self.seen.append((int.from_bytes(st.level, 'little') if isinstance(st.level, bytes)
                                  else int(st.level), st.message, {kv.key: kv.value for kv in st.values}))

    def mark(self) -> int:
        return len(self.seen)

    def wait(self, pred, timeout=10.0, since=None):
        """The first status received from now on (or since ``mark()`` gave ``since``) that satisfies
        ``pred(level, message, values)``."""
        start = len(self.seen) if since is None else since
        found = []
        wait_for(lambda: found or found.extend(s for s in self.seen[start:] if pred(*s)) or found, timeout)
        assert found, self.seen[-3:]
        return found[0]


OK, WARN, ERROR = 0, 1, 2


def test_engine_non_finite_outputs_are_frame_errors(bundle_dir):
    """A subnormal manifest std (1/std = Inf: the input becomes Inf/NaN) or a head whose logits overflow:
    Engine.infer raises FrameError non_finite (the adaptation node calls it too), in every mode."""
    import dataclasses

    from edge_tl_ros.engine import Engine
    from edge_tl_ros.imaging import FrameError

    good = load_bundle(bundle_dir)
    inp = dict(good.manifest['input'], std=[1e-45, 1e-45, 1e-45])  # > 0, so it passes read_manifest
    bad = dataclasses.replace(good, manifest=dict(good.manifest, input=inp))
    img = frame('red')
    with np.errstate(all='ignore'):
        for mode in ('feature_extractor', 'incremental', 'full'):
            eng = Engine(bad, mode)
            with pytest.raises(FrameError) as e:
                eng.infer(img, 'rgb')
            assert e.value.reason == 'non_finite', e.value
        eng = Engine(good, head=Head(np.full((3, 8), 3e38, np.float32), np.zeros(3, np.float32), TOY_CLASSES))
        with pytest.raises(FrameError) as e:  # finite features, logits overflow to Inf, softmax NaN
            eng.infer(img, 'rgb')
        assert e.value.reason == 'non_finite' and 'head' in str(e.value)
    assert TOY_CLASSES[Engine(good).infer(img, 'rgb').topk(1)[0][0]] == 'red'


def test_non_finite_frames_are_counted_rejects_not_empty_classifications(ros_context, bundle_dir, tmp_path):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', diagnostics_period_s=0.2)
    diag = DiagWatch(h)
    try:
        assert h.classify('red') == 'red'
        good_inv_std = h.node.engine._inv_std
        h.node.engine._inv_std = np.full((3, 1, 1), np.inf, np.float32)  # every input pixel Inf or NaN
        sent = []
        with np.errstate(all='ignore'):
            for _ in range(3):
                msg = h.image_msg(frame('green'))
                sent.append(msg.header.stamp.sec)
                h.pub.publish(msg)
                assert wait_for(lambda: h.node.reject_reasons['non_finite'] == len(sent))
        level, message, kv = diag.wait(lambda lv, m, kv: kv.get('rejected.non_finite') == '3')
        assert level == WARN and 'non_finite' in message
        h.node.engine._inv_std = good_inv_std
        assert h.classify('blue') == 'blue'  # the next good frame classifies again
        assert not [r for r in h.results if r.header.stamp.sec in sent]  # nothing published for them
        assert all(r.results for r in h.results)
        s = h.node.stats()
        assert s['processed'] + s['rejected'] + s['dropped'] == s['received'] and s['rejected'] == 3
    finally:
        h.close()


class Boom(BaseException):
    """What an inference thread cannot catch per frame (like SystemExit or KeyboardInterrupt)."""


def test_inference_thread_never_dies_silently(ros_context, bundle_dir, tmp_path):
    """Errors anywhere in the frame path are counted and the loop goes on; an error that ends the thread
    is reported as ERROR by the diagnostics timer, which restarts it (inference_restarts)."""
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', diagnostics_period_s=0.2,
                publish_debug_image=True)
    diag = DiagWatch(h)
    debug = []
    h.io.create_subscription(Image, '/perception/debug_image', debug.append, 10)
    node = h.node
    try:
        assert wait_for(lambda: node.pub_debug.get_subscription_count() > 0)
        assert h.classify('red') == 'red' and wait_for(lambda: debug)
        # the debug image fails: the classification went out, the failure is counted, the loop goes on
        real_debug = node._publish_debug

        def broken_debug(*a):
            raise RuntimeError('overlay failed')
        node._publish_debug = broken_debug
        assert h.classify('green') == 'green'
        assert wait_for(lambda: node.publish_errors == 1)
        node._publish_debug = real_debug
        # a result without hypotheses no longer raises IndexError in the overlay
        real_debug(h.image_msg(frame('red')), frame('red'), 'rgb', Classification())
        # publishing the classification fails: a counted reject (publish_error), the next frame is served
        real_pub = node.pub_cls

        class BrokenPublisher:
            def publish(self, msg):
                raise RuntimeError('rmw publish failed')
        node.cameras[0].pub_cls = BrokenPublisher()
        h.pub.publish(h.image_msg(frame('blue')))
        assert wait_for(lambda: node.reject_reasons['publish_error'] == 1)
        node.cameras[0].pub_cls = real_pub
        assert h.classify('blue') == 'blue'
        # an exception escaping the whole frame path: counted once as inference_error, thread alive
        real_process = node._process
        failures = [RuntimeError('bug in the frame path')]  # each raised once, by the next frame

        def failing_process(msg, t_in, cam=None):
            if failures:
                raise failures.pop(0)
            return real_process(msg, t_in, cam)
        node._process = failing_process
        h.pub.publish(h.image_msg(frame('red')))
        assert wait_for(lambda: node.reject_reasons['inference_error'] == 1)
        assert node._worker.is_alive()
        # a BaseException ends the thread: ERROR in /diagnostics with the reason, restarted, serving again
        for n, (fail, why) in enumerate(((Boom('injected'), 'Boom: injected'),
                                         (SystemExit(3), 'SystemExit: 3')), 1):
            failures.append(fail)
            since = diag.mark()
            h.pub.publish(h.image_msg(frame('red')))
            level, message, kv = diag.wait(lambda lv, m, kv: kv.get('inference_restarts') == str(n),
                                           since=since)
            assert level == ERROR and f'inference thread died: {why}' in message, message
            assert h.classify('green') == 'green'
        assert node.reject_reasons['inference_error'] == 3  # every frame taken is accounted once
        # not sticky: once the period has no problem the level is OK again, the counters stay
        level, message, kv = diag.wait(lambda lv, m, kv: lv == OK)
        assert kv['inference_restarts'] == '2' and kv['publish_errors'] == '1'
        assert kv['rejected_frames'] == '4'
        s = node.stats()
        assert s['processed'] + s['rejected'] + s['dropped'] == s['received']
        assert s['processed'] == len(h.results)
    finally:
        h.close()


def test_diagnostics_warn_for_recent_rejects_and_stale_input(ros_context, bundle_dir, tmp_path):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', diagnostics_period_s=0.2,
                stale_input_timeout_s=1.0)
    diag = DiagWatch(h)
    try:
        level, message, _ = diag.wait(lambda lv, m, kv: True)
        assert level == WARN and message == 'no frames received yet'
        bad = Image(height=4, width=4, encoding='32FC1', step=16, data=bytes(64))
        h.pub.publish(bad)
        level, message, kv = diag.wait(lambda lv, m, kv: kv.get('rejected_frames') == '1')
        assert level == WARN and "rejected frames: {'unsupported_encoding': 1}" in message
        assert h.classify('red') == 'red'
        # good frames after it: OK again, while the cumulative counters stay
        level, message, kv = diag.wait(lambda lv, m, kv: lv == OK)
        assert message == 'ok' and kv['rejected_frames'] == '1' and kv['rejected.unsupported_encoding'] == '1'
        # no frames for longer than stale_input_timeout_s: WARN, until a frame comes
        level, message, kv = diag.wait(lambda lv, m, kv: 'no frames for' in m)
        assert level == WARN and float(kv['last_frame_age_s']) > 1.0
        assert h.classify('green') == 'green'
        diag.wait(lambda lv, m, kv: lv == OK)
        # 0 = off (a run-time parameter)
        assert h.node.set_parameters([Parameter('stale_input_timeout_s', value=0.0)])[0].successful
        assert wait_for(lambda: any(float(kv['last_frame_age_s']) > 1.5 for _, _, kv in diag.seen[-2:]))
        level, message, _ = diag.seen[-1]
        assert level == OK and message == 'ok'
        assert not h.node.set_parameters([Parameter('stale_input_timeout_s', value=-1.0)])[0].successful
    finally:
        h.close()


def test_diagnostics_report_the_registry_version_and_a_mismatch(ros_context, bundle_dir, tmp_path):
    h = Harness(ros_context, bundle_dir, tmp_path / 'state', diagnostics_period_s=0.2)
    diag = DiagWatch(h)
    reg = HeadRegistry(load_bundle(bundle_dir), tmp_path / 'state')
    try:
        assert h.classify('red') == 'red'
        _, message, kv = diag.wait(lambda lv, m, kv: 'registry_version' in kv)
        assert kv['head_version'] == kv['registry_version'] == '0' and 'registry' not in message
        reg.add(toy_head(permute=(2, 0, 1)))  # another process moves the registry; nobody reloads
        level, message, kv = diag.wait(lambda lv, m, kv: kv.get('registry_version') == '1')
        assert kv['head_version'] == '0' and level == WARN
        assert "head v0 is not the registry's current v1" in message
        assert h.call(h.reload).success
        level, message, kv = diag.wait(lambda lv, m, kv: kv.get('head_version') == '1')
        assert kv['registry_version'] == '1' and 'registry' not in message
        # this node's ~/rollback moves the registry too: both say v0
        assert h.call(h.rollback).success
        _, message, kv = diag.wait(lambda lv, m, kv: kv.get('head_version') == '0')
        assert kv['registry_version'] == '0' and 'registry' not in message
        # an unreadable registry is reported, the head in use stays
        (reg.dir / 'index.json').write_text('[' * 100_000 + ']' * 100_000)
        level, message, kv = diag.wait(lambda lv, m, kv: kv.get('registry_version') == 'unreadable')
        assert level == WARN and 'head registry unreadable' in message and kv['head_version'] == '0'
        assert h.classify('red') == 'red'
    finally:
        h.close()


def malformed_registries(reg, good_meta):
    """(name, index.json text, extra files): registries a reload must refuse without killing the node."""
    string_weight = npz_head_bytes(weight=np.array([['w'] * 8] * 3), bias=np.zeros(3, np.float32))
    return [
        ('empty object', '{}', {}),
        ('current 1e400', '{"current": 1e400, "accepted": [0], "versions": {}}', {}),
        ('list', '[]', {}),
        ('string version entry', json_index(2, [0, 1, 2], {'1': good_meta, '2': 'head_v2.npz'}), {}),
        ('nested 100000 deep', '[' * 100_000 + ']' * 100_000, {}),
        ('current a string', '{"current": "latest", "accepted": [0], "versions": {}}', {}),
        ('accepted null', '{"current": 1, "accepted": null, "versions": {}}', {}),
        ('versions a list', '{"current": 2, "accepted": [0, 2], "versions": [1, 2]}', {}),
        ('not utf-8', b'\xff\xfe{"current"', {}),
        ('string weight npz', json_index(2, [0, 1, 2], {'1': good_meta, '2': {'file': 'head_v2.npz'}}),
         {'head_v2.npz': string_weight}),
    ]


def json_index(current, accepted, versions):
    import json

    return json.dumps({'current': current, 'accepted': accepted, 'versions': versions})


def npz_head_bytes(**arrays):
    from edge_tl_ros.atomic import npz_bytes

    arrays.setdefault('class_names', np.array(TOY_CLASSES))
    return npz_bytes(**arrays)


def test_malformed_registry_never_kills_the_node(ros_context, bundle_dir, tmp_path):
    """~/reload_head, ~/rollback and head_version on malformed index.json / head npz files: always an
    answer with the reason, the current head stays and classifies the next frame."""
    state = tmp_path / 'state'
    reg = HeadRegistry(load_bundle(bundle_dir), state)
    reg.add(toy_head(permute=(2, 0, 1)))  # v1: red frames -> 'green' (shows which head is in use)
    good_index = reg.index_path.read_bytes()
    good_meta = reg.index()['versions']['1']
    h = Harness(ros_context, bundle_dir, state)
    try:
        assert h.node.head_version == 1 and h.classify('red') == 'green'
        for name, index, files in malformed_registries(reg, good_meta):
            for fname, data in files.items():
                (reg.dir / fname).write_bytes(data)
            reg.index_path.write_bytes(index if isinstance(index, bytes) else index.encode())
            r = h.call(h.reload)
            assert r is not None and not r.success and 'keeping head v1' in r.message, (name, r)
            assert len(r.message) < 700 and '\n' not in r.message, (name, r.message)
            res = h.node.set_parameters([Parameter('head_version', value=2)])[0]
            assert not res.successful and res.reason, name
            r = h.call(h.rollback)  # may legitimately succeed on some (v1 is still good): it answers
            assert r is not None, name
            if r.success:
                assert h.node.head_version in (0, 1)
            reg.index_path.write_bytes(good_index)
            assert h.call(h.reload).success and h.node.head_version == 1, name
            assert h.classify('red') == 'green', name
        assert h.node.get_parameter('head_version').value == -1
    finally:
        h.close()


@pytest.mark.parametrize('want', [-1, 1, 7])
def test_start_up_on_a_malformed_registry_falls_back(ros_context, bundle_dir, tmp_path, want):
    """A node started on a malformed registry (or head_version that cannot be loaded) starts on a
    fallback head with a warning instead of refusing to start."""
    bundle = load_bundle(bundle_dir)
    for k, (name, index, files) in enumerate(malformed_registries(HeadRegistry(bundle, tmp_path / 'x'),
                                                                  {'file': 'head_v1.npz'})):
        state = tmp_path / f's{k}'
        reg = HeadRegistry(bundle, state)
        reg.add(toy_head(permute=(2, 0, 1)))
        for fname, data in files.items():
            (reg.dir / fname).write_bytes(data)
        reg.index_path.write_bytes(index if isinstance(index, bytes) else index.encode())
        node = PerceptionNode(context=ros_context, parameter_overrides=[
            Parameter('model_bundle', value=str(bundle_dir)), Parameter('state_dir', value=str(state)),
            Parameter('head_version', value=want)])
        try:
            assert node.head_version in (0, 1), name  # v1 (the last good one) or the bundle head
            assert TOY_CLASSES[node.engine.infer(frame('red'), 'rgb').topk(1)[0][0]] in ('red', 'green')
            assert node._worker.is_alive()
        finally:
            node.destroy_node()
    # and through DDS: a node on a registry that cannot be parsed at all classifies with the bundle head
    state = tmp_path / 'deep'
    HeadRegistry(bundle, state).add(toy_head(permute=(2, 0, 1)))
    (state / 'heads' / 'index.json').write_text('[' * 100_000 + ']' * 100_000)
    h = Harness(ros_context, bundle_dir, state, head_version=want)
    try:
        assert h.node.head_version == 0 and h.classify('red') == 'red'
    finally:
        h.close()


def test_min_score_publishes_no_class_below_the_reject_threshold(ros_context, bundle_dir, tmp_path):
    """A frame whose best calibrated score is below ``min_score`` is published with empty results and
    counted as unknown (not dropped, not rejected); -1 takes the bundle's ``reject.min_score``."""
    from edge_tl_ros.engine import Engine
    from edge_tl_ros.training.manifest import update_manifest

    eng = Engine(load_bundle(bundle_dir), 'feature_extractor')
    grey = np.full((24, 32, 3), 128, np.uint8)
    p_red = float(eng.infer(frame('red'), 'rgb').probs.max())
    p_grey = float(eng.infer(grey, 'rgb').probs.max())
    assert p_grey < p_red, (p_grey, p_red)
    cut = round((p_grey + p_red) / 2, 4)
    update_manifest(bundle_dir, reject={'min_score': cut})
    h = Harness(ros_context, bundle_dir, tmp_path / 'state')
    try:
        assert h.node.get_parameter('min_score').value == -1.0 and h.node._min_score == cut
        assert h.classify('red') == 'red'
        r = h.send(h.image_msg(grey))
        assert r is not None and list(r.results) == []
        s = h.node.stats()
        assert s['unknown'] == 1 and s['rejected'] == 0 and s['processed'] == 2
        assert h.node.set_parameters([Parameter('min_score', value=0.0)])[0].successful  # 0 = never
        r = h.send(h.image_msg(grey))
        assert r is not None and len(r.results) >= 1 and h.node.stats()['unknown'] == 1
        assert not h.node.set_parameters([Parameter('min_score', value=1.5)])[0].successful
    finally:
        h.close()
