"""Privacy: no topic publishes raw frames, stored crops or their features unless the user enables it.

- With both nodes up (perception in ``feature_extractor`` mode) the ROS graph is enumerated: our nodes
  publish no sensor_msgs/Image or CompressedImage except ``/perception/debug_image``; there is no
  ``~/features``. Then every topic they publish is recorded as raw serialized bytes while labelled frames
  flow and a round runs, and searched for the bytes of the input frames, the stored PNG crops and the
  stored features: none appear. Positive controls prove the search would find them: in ``incremental``
  mode the features are found on ``~/features``, and with ``publish_debug_image`` *and* a subscriber
  the frame's pixels are found on ``~/debug_image`` (enabled without a subscriber, or subscribed while
  disabled: nothing is published).
- The store honours its age / size limits at run time (set over the parameter service) and
  ``~/wipe_store``: the files are gone, a restarted node finds nothing.
"""

import importlib
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from test_adaptation_node import IO, make_node, wait_for  # noqa: E402
from test_reliability_models import ParamRemote  # noqa: E402
from vision_msgs.msg import Classification, ObjectHypothesis  # noqa: E402

from edge_tl_ros.bundle import load_bundle  # noqa: E402
from edge_tl_ros.engine import Engine  # noqa: E402
from edge_tl_ros.nodes.perception_node import PerceptionNode  # noqa: E402
from edge_tl_ros.store import FrameStore  # noqa: E402
from edge_tl_ros.toy import make_toy_bundle, toy_frames  # noqa: E402

IMAGE_TYPES = {'sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage'}


def msg_class(type_name: str):
    pkg, kind, name = type_name.split('/')
    return getattr(importlib.import_module(f'{pkg}.{kind}'), name)


def published(io_node, node_name: str) -> dict:
    return {t: tuple(types) for t, types in io_node.get_publisher_names_and_types_by_node(node_name, '/')}


class RawRecorder:
    """Raw serialized messages of every topic the given nodes publish (subscribed with raw=True)."""

    def __init__(self, node, topics: dict):
        self.payloads: dict[str, list[bytes]] = {t: [] for t in topics}
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        for topic, types in topics.items():
            node.create_subscription(msg_class(types[0]), topic,
                                     lambda b, t=topic: self.payloads[t].append(bytes(b)), qos, raw=True)

    def find(self, needle: bytes) -> list[str]:
        return [t for t, msgs in self.payloads.items() if any(needle in m for m in msgs)]


def noisy_frames(rng, n, shifted=True):
    imgs, y = toy_frames(rng, n, shifted=shifted)
    imgs = np.clip(imgs.astype(np.int16) + rng.integers(-25, 25, imgs.shape), 0, 255).astype(np.uint8)
    return imgs, y


def spin_all(ctx, *nodes):
    ex = MultiThreadedExecutor(num_threads=4, context=ctx)
    for n in nodes:
        ex.add_node(n)
    threading.Thread(target=ex.spin, daemon=True).start()
    return ex


def test_no_topic_publishes_frames_crops_or_features(ros_context, tmp_path):
    toy = make_toy_bundle(tmp_path / 'toy')
    state = tmp_path / 'state'
    perc = PerceptionNode(context=ros_context, parameter_overrides=[
        Parameter('model_bundle', value=str(toy)), Parameter('state_dir', value=str(state)),
        Parameter('qos_reliability', value='reliable'), Parameter('qos_depth', value=50)])
    adapt = make_node(ros_context, toy, state, **{'store.sample_rate_hz': 1000.0, 'store.keep_fraction': 1.0,
                                                 'advanced.selection': 'uniform'})
    io = IO(ros_context)
    ex = spin_all(ros_context, perc, adapt, io.node)
    try:
        assert wait_for(lambda: io.pub_img.get_subscription_count() >= 2, 10)
        topics = {}
        for name in ('perception', 'adaptation'):
            pubs = published(io.node, name)
            topics.update(pubs)
            images = {t for t, types in pubs.items() if set(types) & IMAGE_TYPES}
            assert images <= {'/perception/debug_image'}, (name, images)
        assert set(published(io.node, 'perception')) == {
            '/perception/classification', '/diagnostics', '/perception/debug_image', '/rosout',
            '/parameter_events'}
        assert set(published(io.node, 'adaptation')) == {
            '/adaptation/status', '/diagnostics', '/rosout', '/parameter_events'}
        rec = RawRecorder(io.node, topics)
        time.sleep(0.5)  # raw subscriptions matched

        rng = np.random.default_rng(7)
        imgs, y = noisy_frames(rng, 60)
        io.send(imgs, y, period=0.02)
        more, _ = noisy_frames(rng, 20)
        io.send(more, period=0.05)  # unlabelled frames, sampled into the store too
        assert wait_for(lambda: adapt.store.label_counts()['topic'] >= 50 and len(adapt.store) >= 65, 20), \
            adapt.status()
        assert io.call(io.adapt_now).success
        assert wait_for(lambda: adapt.rounds == 1, 60)
        time.sleep(1.5)  # one more status / diagnostics period
        assert rec.payloads['/perception/classification'] and rec.payloads['/adaptation/status']

        # needles: input frame rows, stored PNG crops (chunks), stored features, features of the frames
        st = FrameStore(state / 'store', readonly=True)
        arr = st.entries()
        crops, _ = st.crops(arr.stamps)
        eng = Engine(load_bundle(toy))
        needles = [img[8].tobytes() for img in imgs[:20]]  # a 48-byte row of noise
        needles += [f.astype(np.float32).tobytes() for f in arr.features]
        needles += [eng.infer(img, 'rgb').features.astype(np.float32).tobytes() for img in imgs[:20]]
        needles += [c[4].tobytes() for c in crops[:20]]  # decoded crop rows (192 bytes)
        for z in st._load_entries(arr.stamps[:20], keys=('meta', 'crop')):
            png = z['crop'].tobytes()
            needles += [png[i:i + 48] for i in range(64, len(png) - 48, 256)]
        assert len(needles) > 150
        leaks = {t for n in needles for t in rec.find(n)}
        assert not leaks, f'stored frames or features found on {leaks}'
    finally:
        ex.shutdown(timeout_sec=2)
        for n in (perc, adapt, io.node):
            n.destroy_node()


def test_positive_controls_features_and_debug_image(ros_context, tmp_path):
    from sensor_msgs.msg import Image
    from test_perception_node import Harness, frame

    toy = make_toy_bundle(tmp_path / 'toy')
    # incremental: features are published (the search above would have found them)
    h = Harness(ros_context, toy, tmp_path / 'state', deployment_mode='incremental')
    try:
        assert '/perception/features' in published(h.io, 'perception')
        rec = RawRecorder(h.io, {'/perception/features': ('sensor_msgs/msg/Image',)})
        time.sleep(0.3)
        img = frame('blue')
        assert h.send(h.image_msg(img)) is not None
        want = Engine(load_bundle(toy)).infer(img, 'rgb').features.astype(np.float32).tobytes()
        assert wait_for(lambda: rec.find(want), 5)
    finally:
        h.close()
    # feature_extractor + debug image: only when enabled AND subscribed
    h = Harness(ros_context, toy, tmp_path / 'state')
    try:
        calls = []
        real = h.node.pub_debug.publish
        h.node.pub_debug.publish = lambda m: (calls.append(1), real(m))
        h.classify('red')
        assert h.node.set_parameters([Parameter('publish_debug_image', value=True)])[0].successful
        h.classify('red')
        assert not calls, 'debug image published without a subscriber'
        got = []
        h.io.create_subscription(Image, '/perception/debug_image', got.append, 10)
        assert wait_for(lambda: h.node.pub_debug.get_subscription_count() > 0, 5)
        img = np.ascontiguousarray(np.broadcast_to(np.array([200, 10, 90], np.uint8), (24, 32, 3)))
        h.send(h.image_msg(img))
        assert wait_for(lambda: got, 5) and got[0].encoding == 'bgr8'
        assert bytes([90, 10, 200]) * 4 in bytes(got[0].data)  # the frame's pixels: a real leak if unasked
        assert h.node.set_parameters([Parameter('publish_debug_image', value=False)])[0].successful
        n = len(calls)
        h.classify('green')
        time.sleep(0.2)
        assert len(calls) == n, 'debug image published while disabled'
    finally:
        h.close()


def send_until_stored(io, files, imgs, labels, attempts=5):
    """Publish labelled frames one at a time, each until the node has stored it (a best-effort camera
    subscription may lose a frame while this shared machine is busy; a resend carries a new stamp)."""
    for img, y in zip(imgs, labels):
        n = len(files())
        for _ in range(attempts):
            io.send([img], [y], period=0.0)
            if wait_for(lambda: len(files()) > n, 3):
                break
        else:
            raise AssertionError(f'frame not stored after {attempts} sends')


def test_store_limits_and_wipe_through_the_node(ros_context, tmp_path):
    toy = make_toy_bundle(tmp_path / 'toy')
    state = tmp_path / 'state'
    node = make_node(ros_context, toy, state, **{'advanced.diagnostics_period_s': 0.2})
    io = IO(ros_context)
    ex = spin_all(ros_context, node, io.node)
    remote = ParamRemote(io.node, '/adaptation')
    files = lambda: sorted((state / 'store').glob('f_*.npz'))  # noqa: E731
    try:
        assert wait_for(lambda: io.pub_img.get_subscription_count()
                        and io.pub_lab.get_subscription_count(), 10)
        rng = np.random.default_rng(3)
        imgs, y = noisy_frames(rng, 40)
        send_until_stored(io, files, imgs, y)
        assert len(files()) == 40 == len(node.store), node.status()
        # size cap, over the parameter service: the disk holds at most that many bytes
        cap = sum(p.stat().st_size for p in files()) // 2
        assert remote.set('store.max_bytes', cap).successful
        assert sum(p.stat().st_size for p in files()) <= cap and len(files()) == len(node.store) < 40
        assert remote.set('store.max_entries', 10).successful and len(files()) == 10
        # age limit: the node's timer deletes entries older than store_max_age_s from the disk
        assert remote.set('store.max_age_s', 1.0).successful
        assert wait_for(lambda: not files(), 5), node.status()
        assert remote.set('store.max_age_s', 0.0).successful  # 0 = no age limit
        # wipe: entries, a stray temp file and pending labels go; a restarted node finds nothing
        send_until_stored(io, files, noisy_frames(rng, 10)[0], [0] * 10)
        assert len(files()) == 10
        (state / 'store' / '.f_00000000000000000001.npz.abc.tmp').write_bytes(b'half a crop')
        # a label waiting for its frame (stamp 0, never sent); labels of lost frames may wait as well
        io.pub_lab.publish(Classification(results=[ObjectHypothesis(class_id='red', score=1.0)]))
        assert wait_for(lambda: 0 in node.collector._pending and node.status()['pending_labels'] >= 1, 5)
        r = io.call(io.node.create_client(Trigger, '/adaptation/wipe_store'))
        assert r.success and 'wiped 10' in r.message
        # only the store's ownership marker stays (no frame data in it)
        assert [p.name for p in (state / 'store').iterdir()] == ['.edge_tl_store']
        assert node.status()['pending_labels'] == 0
    finally:
        ex.shutdown(timeout_sec=2)
        node.destroy_node()
        io.node.destroy_node()
    assert len(FrameStore(state / 'store')) == 0
