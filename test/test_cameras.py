"""Several cameras in one perception node: one model, batched inference, per-camera outputs and
diagnostics (real rclpy on Fast DDS, a real ONNX Runtime session, a real toy bundle)."""

import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from vision_msgs.msg import Classification  # noqa: E402

from edge_tl_ros.bundle import load_bundle  # noqa: E402
from edge_tl_ros.engine import Engine  # noqa: E402
from edge_tl_ros.imaging import FrameError, image_fields  # noqa: E402
from edge_tl_ros.nodes.perception_node import PerceptionNode, camera_layout  # noqa: E402
from edge_tl_ros.toy import make_toy_bundle  # noqa: E402

COLOURS = {'red': (220, 30, 30), 'green': (30, 220, 30), 'blue': (30, 30, 220)}
CAMERAS = ['front', 'rear', 'side']
TOPICS = {'front': '/cams/front/image_raw', 'rear': '/rear/image', 'side': '/side/image'}


def frame(name, h=24, w=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = COLOURS[name]
    return img


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


@pytest.fixture
def bundle_dir(tmp_path):
    return make_toy_bundle(tmp_path / 'toy')


def test_camera_layout_names_topics_and_errors():
    assert camera_layout([], []) == [('', 'image')]
    assert camera_layout(['front', 'rear'], []) == [('front', 'front/image'), ('rear', 'rear/image')]
    assert camera_layout(['front', 'rear'], ['/a/image_raw', '']) == [('front', '/a/image_raw'),
                                                                    ('rear', 'rear/image')]
    for names, topics, what in ((['a', 'a'], [], 'unique'), (['a b'], [], 'name tokens'),
                                (['1cam'], [], 'name tokens'), (['a', 'b'], ['/x'], '1 entries for 2'),
                                ([], ['/x'], 'needs cameras')):
        with pytest.raises(ValueError, match=what):
            camera_layout(names, topics)


def test_infer_many_equals_frame_by_frame_and_fails_one_frame_alone(bundle_dir):
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (20 + 4 * i, 30, 3), dtype=np.uint8) for i in range(4)]
    one = [engine.infer(im, 'rgb') for im in imgs]
    many = engine.infer_many([(im, 'rgb', None) for im in imgs])
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
    # a degenerate crop of one frame (0 pixels wide) fails that frame only; the batch buffer grows as needed
    bad = np.zeros((10, 0, 3), np.uint8)
    out = engine.infer_many([(imgs[0], 'rgb', None), (bad, 'rgb', None)] + [(im, 'rgb', None) for im in imgs])
    assert isinstance(out[1], FrameError)
    np.testing.assert_allclose(out[0].probs, one[0].probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[5].probs, one[3].probs, rtol=1e-5, atol=1e-6)


class Cameras:
    """A three-camera perception node and a test node with one publisher / subscriber per camera."""

    def __init__(self, ctx, bundle, state_dir, **params):
        overrides = [Parameter('model_bundle', value=str(bundle)),
                     Parameter('state_dir', value=str(state_dir)),
                     Parameter('qos_reliability', value='reliable'),
                     Parameter('cameras', value=CAMERAS),
                     Parameter('camera_topics', value=[TOPICS['front'], '', ''])]
        overrides += [Parameter(k, value=v) for k, v in params.items()]
        # rear and side keep their default <name>/image inputs; remap one of them as a launch file would
        self.node = PerceptionNode(context=ctx, parameter_overrides=overrides,
                                   cli_args=['--ros-args', '-r', 'rear/image:=/rear/image',
                                             '-r', 'side/image:=/side/image'])
        self.io = rclpy.create_node('test_io', context=ctx)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pubs = {c: self.io.create_publisher(Image, TOPICS[c], qos) for c in CAMERAS}
        self.results = {c: [] for c in CAMERAS}
        for c in CAMERAS:
            self.io.create_subscription(Classification, f'/perception/{c}/classification',
                                        self.results[c].append, 50)
        self.diags = []
        self.io.create_subscription(DiagnosticArray, '/diagnostics', self.diags.append, 50)
        self.ex = MultiThreadedExecutor(num_threads=4, context=ctx)
        self.ex.add_node(self.node)
        self.ex.add_node(self.io)
        threading.Thread(target=self.ex.spin, daemon=True).start()
        assert wait_for(lambda: all(p.get_subscription_count() for p in self.pubs.values()))
        assert wait_for(lambda: all(self.io.count_publishers(f'/perception/{c}/classification')
                                    for c in CAMERAS))
        self.stamp = 0

    def msg(self, img, encoding='rgb8'):
        self.stamp += 1
        m = Image(**image_fields(img, encoding))
        m.header.stamp.sec = self.stamp
        return m

    def close(self):
        self.ex.shutdown(timeout_sec=2)
        self.node.destroy_node()
        self.io.destroy_node()


def _hold_inference(node):
    """Make the inference thread wait inside the next single frame until released, and record every
    batched call, so that frames of all cameras are waiting together when it takes the next ones."""
    gate, entered, batches = threading.Event(), threading.Event(), []
    real_infer, real_many = node.engine.infer, node.engine.infer_many

    def held_infer(*a, **k):
        entered.set()
        gate.wait(10)
        return real_infer(*a, **k)

    def recorded_many(frames):
        batches.append(len(frames))
        return real_many(frames)
    node.engine.infer = held_infer
    node.engine.infer_many = recorded_many
    return gate, entered, batches


def test_three_cameras_one_model_batched_per_camera_outputs(ros_context, bundle_dir, tmp_path):
    h = Cameras(ros_context, bundle_dir, tmp_path / 'state')
    node = h.node
    try:
        assert [c.topic for c in node.cameras] == [TOPICS['front'], 'rear/image', 'side/image']
        engine = node.engine  # one model instance for every camera
        gate, entered, batches = _hold_inference(node)
        h.pubs['front'].publish(h.msg(frame('red')))  # taken alone; the thread waits inside it
        assert entered.wait(10)
        want = {'front': 'green', 'rear': 'blue', 'side': 'red'}
        for cam, colour in want.items():
            h.pubs[cam].publish(h.msg(frame(colour)))
        assert wait_for(lambda: all(c.slot for c in node.cameras))
        gate.set()
        assert wait_for(lambda: all(len(h.results[c]) >= (2 if c == 'front' else 1) for c in CAMERAS))
        assert batches and batches[0] == 3, batches  # the three waiting frames went in one ORT call
        assert node.engine is engine
        assert h.results['front'][0].results[0].class_id == 'red'
        for cam, colour in want.items():  # each camera's frame came back on its own topic, in batch order
            assert h.results[cam][-1].results[0].class_id == colour, cam
        s = node.stats()
        assert s['cameras']['front']['processed'] == 2 and s['cameras']['rear']['processed'] == 1
        assert s['processed'] == 4 and s['received'] == 4 and s['dropped'] == 0 and s['rejected'] == 0
    finally:
        h.close()


def test_a_bad_frame_fails_its_camera_only_and_diagnostics_are_per_camera(ros_context, bundle_dir, tmp_path):
    h = Cameras(ros_context, bundle_dir, tmp_path / 'state', diagnostics_period_s=0.2)
    node = h.node
    try:
        gate, entered, batches = _hold_inference(node)
        h.pubs['front'].publish(h.msg(frame('red')))
        assert entered.wait(10)
        bad = h.msg(frame('green'))
        bad.data = bytes(bad.data)[:10]  # truncated buffer: a counted reject on rear only
        h.pubs['rear'].publish(bad)
        h.pubs['front'].publish(h.msg(frame('blue')))
        assert wait_for(lambda: node.cameras[0].slot and node.cameras[1].slot)
        gate.set()
        assert wait_for(lambda: len(h.results['front']) == 2 and node.cameras[1].rejected == 1)
        assert h.results['front'][1].results[0].class_id == 'blue' and not h.results['rear']
        assert batches == [1]  # the rear frame failed decoding; the front one still went through the batch
        rear = node.stats()['cameras']['rear']
        assert rear['rejected'] == 1 and rear['processed'] == 0 and list(rear['reject_reasons']) != []
        # /diagnostics: the node's status plus one per camera; side has never had a frame -> WARN there
        # (and in the node's summary), front is OK once its period has no problem
        name = node.get_fully_qualified_name()

        def statuses():
            for arr in reversed(h.diags):
                by = {s.name: s for s in arr.status}
                if len(by) == 4:
                    return by
            return None
        assert wait_for(lambda: statuses() is not None
                        and statuses()[f'{name}: camera front'].level == DiagnosticStatus.OK)
        by = statuses()
        assert set(by) == {f'{name}: student inference'} | {f'{name}: camera {c}' for c in CAMERAS}
        side = by[f'{name}: camera side']
        assert side.level == DiagnosticStatus.WARN and 'no frames received yet' in side.message
        kv = {v.key: v.value for v in by[f'{name}: camera front'].values}
        assert kv['topic'] == TOPICS['front'] and kv['frames_out'] == '2'
        kv = {v.key: v.value for v in by[f'{name}: camera rear'].values}
        assert kv['topic'] == '/rear/image' and kv['rejected_frames'] == '1'
        top = by[f'{name}: student inference']
        assert top.level == DiagnosticStatus.WARN and 'side: no frames received yet' in top.message
        kv = {v.key: v.value for v in top.values}
        assert kv['cameras'] == '3' and kv['frames_out'] == '2' and kv['rejected_frames'] == '1'
    finally:
        h.close()


def test_bad_camera_parameters_refuse_to_start(ros_context, bundle_dir, tmp_path):
    with pytest.raises(ValueError, match='unique'):
        PerceptionNode(context=ros_context, parameter_overrides=[
            Parameter('model_bundle', value=str(bundle_dir)), Parameter('state_dir', value=str(tmp_path)),
            Parameter('cameras', value=['front', 'front'])])
