"""perception_lifecycle_node: the perception node as a managed node, driven through its real lifecycle
services (lifecycle_msgs/srv/ChangeState, GetState) over Fast DDS with a real ONNX Runtime session."""

import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from vision_msgs.msg import Classification  # noqa: E402

from edge_tl_ros.imaging import image_fields  # noqa: E402
from edge_tl_ros.nodes.perception_node import PerceptionLifecycleNode  # noqa: E402
from edge_tl_ros.toy import make_toy_bundle  # noqa: E402


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


class Managed:
    def __init__(self, ctx, bundle, state_dir):
        self.node = PerceptionLifecycleNode(context=ctx, parameter_overrides=[
            Parameter('model_bundle', value=str(bundle)), Parameter('state_dir', value=str(state_dir)),
            Parameter('qos_reliability', value='reliable')])
        self.io = rclpy.create_node('lifecycle_probe', context=ctx)
        self.pub = self.io.create_publisher(Image, 'image', QoSProfile(depth=10,
                                                                       reliability=ReliabilityPolicy.RELIABLE))
        self.results = []
        self.io.create_subscription(Classification, '/perception/classification', self.results.append, 50)
        self.change = self.io.create_client(ChangeState, '/perception/change_state')
        self.get = self.io.create_client(GetState, '/perception/get_state')
        self.reload = self.io.create_client(Trigger, '/perception/reload_head')
        self.ex = MultiThreadedExecutor(num_threads=4, context=ctx)
        self.ex.add_node(self.node)
        self.ex.add_node(self.io)
        threading.Thread(target=self.ex.spin, daemon=True).start()
        self.stamp = 0

    def call(self, client, request, timeout=10.0):
        assert client.wait_for_service(timeout_sec=timeout)
        fut = client.call_async(request)
        assert wait_for(fut.done, timeout)
        return fut.result()

    def transition(self, tid) -> bool:
        return self.call(self.change, ChangeState.Request(transition=Transition(id=tid))).success

    def state(self) -> str:
        return self.call(self.get, GetState.Request()).current_state.label

    def send(self, colour=(220, 30, 30)) -> None:
        img = np.zeros((24, 32, 3), np.uint8)
        img[:] = colour
        msg = Image(**image_fields(img, 'rgb8'))
        self.stamp += 1
        msg.header.stamp.sec = self.stamp
        self.pub.publish(msg)

    def close(self):
        self.ex.shutdown(timeout_sec=2)
        self.node.destroy_node()
        self.io.destroy_node()


def test_configure_loads_the_model_activate_turns_inference_on_deactivate_off(ros_context, tmp_path):
    m = Managed(ros_context, make_toy_bundle(tmp_path / 'toy'), tmp_path / 'state')
    node = m.node
    try:
        # unconfigured: parameters are there (ros2 param works), no model, no camera subscription
        assert m.state() == 'unconfigured'
        assert node.engine is None and node.has_parameter('model_bundle')
        assert m.io.count_subscribers('/image') == 0
        assert not m.reload.wait_for_service(timeout_sec=0.5)
        # configure: bundle, head and ONNX Runtime session loaded, services up, still no inference
        assert m.transition(Transition.TRANSITION_CONFIGURE) and m.state() == 'inactive'
        assert node.engine is not None and node.engine.session is not None
        assert m.call(m.reload, Trigger.Request()).success
        assert m.io.count_subscribers('/image') == 0
        m.send()
        time.sleep(0.5)
        assert node.received == 0 and not m.results
        # activate: subscribed, frames are classified
        assert m.transition(Transition.TRANSITION_ACTIVATE) and m.state() == 'active'
        assert wait_for(lambda: m.pub.get_subscription_count() == 1)
        engine = node.engine
        m.send()
        assert wait_for(lambda: m.results) and m.results[-1].results[0].class_id == 'red'
        # deactivate: unsubscribed and the inference thread stopped; the model stays loaded
        assert m.transition(Transition.TRANSITION_DEACTIVATE) and m.state() == 'inactive'
        assert wait_for(lambda: m.pub.get_subscription_count() == 0)
        assert not node._worker.is_alive() and node.engine is engine
        n = len(m.results)
        m.send()
        time.sleep(0.5)
        assert len(m.results) == n and node.received == 1
        # activate again: same model, serving again
        assert m.transition(Transition.TRANSITION_ACTIVATE)
        assert wait_for(lambda: m.pub.get_subscription_count() == 1)
        m.send((30, 220, 30))
        assert wait_for(lambda: len(m.results) > n) and m.results[-1].results[0].class_id == 'green'
        assert node.engine is engine
        # deactivate + cleanup: the model is released, the node is back to unconfigured
        assert m.transition(Transition.TRANSITION_DEACTIVATE)
        assert m.transition(Transition.TRANSITION_CLEANUP) and m.state() == 'unconfigured'
        assert node.engine is None and node.cameras == []
        assert wait_for(lambda: m.io.count_publishers('/perception/classification') == 0)
    finally:
        m.close()


def test_a_bad_bundle_fails_configure_and_the_node_stays_unconfigured(ros_context, tmp_path):
    (tmp_path / 'empty').mkdir()
    m = Managed(ros_context, tmp_path / 'empty', tmp_path / 'state')
    try:
        assert not m.transition(Transition.TRANSITION_CONFIGURE)
        assert m.state() == 'unconfigured' and m.node.engine is None
        assert m.call(m.get, GetState.Request()).current_state.id == State.PRIMARY_STATE_UNCONFIGURED
        assert not m.transition(Transition.TRANSITION_ACTIVATE)  # not a transition from unconfigured
    finally:
        m.close()


def test_managed_adaptation_node_collects_and_runs_rounds_only_while_active(ros_context, tmp_path):
    import json

    from rclpy.qos import DurabilityPolicy
    from std_msgs.msg import String
    from vision_msgs.msg import ObjectHypothesis

    from edge_tl_ros.nodes.adaptation_node import AdaptationLifecycleNode
    from edge_tl_ros.toy import TOY_CLASSES, toy_frames

    node = AdaptationLifecycleNode(context=ros_context, parameter_overrides=[
        Parameter('model_bundle', value=str(make_toy_bundle(tmp_path / 'toy'))),
        Parameter('state_dir', value=str(tmp_path / 'state')), Parameter('teacher_bundle', value=''),
        Parameter('store.sample_rate_hz', value=0.0), Parameter('round.every_n_labels', value=0),
        Parameter('advanced.sched_idle', value=False)])
    io = rclpy.create_node('adaptation_probe', context=ros_context)
    rel = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    pub_img = io.create_publisher(Image, 'image', rel)
    pub_lab = io.create_publisher(Classification, 'labels', rel)
    status = []
    io.create_subscription(String, '/adaptation/status', lambda m: status.append(json.loads(m.data)),
                           QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                                      durability=DurabilityPolicy.TRANSIENT_LOCAL))
    change = io.create_client(ChangeState, '/adaptation/change_state')
    adapt_now = io.create_client(Trigger, '/adaptation/adapt_now')
    ex = MultiThreadedExecutor(num_threads=4, context=ros_context)
    ex.add_node(node)
    ex.add_node(io)
    threading.Thread(target=ex.spin, daemon=True).start()
    imgs, y = toy_frames(np.random.default_rng(0), 40, shifted=True)
    sent = [0]

    def call(client, request):
        assert client.wait_for_service(timeout_sec=10)
        fut = client.call_async(request)
        assert wait_for(fut.done, 20)
        return fut.result()

    def transition(tid) -> bool:
        return call(change, ChangeState.Request(transition=Transition(id=tid))).success

    def send(n):
        for i in range(n):
            k = sent[0] % len(imgs)
            sent[0] += 1
            msg = Image(**image_fields(imgs[k], 'rgb8'))
            msg.header.stamp.sec = 1000 + sent[0]
            pub_lab.publish(Classification(header=msg.header, results=[
                ObjectHypothesis(class_id=TOY_CLASSES[y[k]], score=1.0)]))
            pub_img.publish(msg)
            time.sleep(0.01)

    try:
        assert not hasattr(node, 'store')  # unconfigured: no store opened
        assert transition(Transition.TRANSITION_CONFIGURE)
        assert wait_for(lambda: status and status[-1]['active'] is False, 10)
        assert io.count_subscribers('/image') == 0 and io.count_subscribers('/labels') == 0
        r = call(adapt_now, Trigger.Request())
        assert not r.success and 'inactive' in r.message  # no rounds while inactive
        assert transition(Transition.TRANSITION_ACTIVATE)
        assert wait_for(lambda: pub_img.get_subscription_count() and pub_lab.get_subscription_count(), 10)
        send(40)
        assert wait_for(lambda: len(node.store) >= 20, 20), node.status()
        assert transition(Transition.TRANSITION_DEACTIVATE)
        assert wait_for(lambda: pub_img.get_subscription_count() == 0, 10)
        stored = len(node.store)
        send(10)
        time.sleep(0.5)
        assert len(node.store) == stored  # nothing collected while inactive; the store stays
        assert not call(adapt_now, Trigger.Request()).success
        assert transition(Transition.TRANSITION_CLEANUP)
        assert wait_for(lambda: io.count_publishers('/adaptation/status') == 0, 10)
        assert not node.collector._thread.is_alive()
    finally:
        ex.shutdown(timeout_sec=2)
        node.destroy_node()
        io.destroy_node()
