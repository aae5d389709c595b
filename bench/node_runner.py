"""The node under test, in its own process: ``PerceptionNode`` (as ``perception_node.main`` runs it) or
the naive baseline (:mod:`bench.naive_node`), or an ``echo`` node (subscribes ``image`` with the
student's QoS and publishes an empty classification with the frame's header at once: the transport
floor of a Python node, no inference).

    python -m bench.node_runner --kind student --stats-out S.json --ready-file R \
        --ros-args -p model_bundle:=models/gtsrb_student -p qos_reliability:=best_effort

Same executor as ``perception_node.main`` (``params.make_executor``: the node's ``executor_threads``,
default 1 = SingleThreadedExecutor). The benchmark adds
instrumentation only from outside the node: ``Engine.swap_head`` and ``Engine.infer`` are wrapped to
record (wall time, duration) of every call, ``PerceptionNode._process`` (the inference thread's
per-frame work) to record when each frame left the slot, and the image subscription's callback to
record when each frame arrived. Records go to pre-allocated arrays (RSS stays flat). On SIGINT it
writes ``node.stats()`` plus those records to ``--stats-out``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

import numpy as np


class Records:
    """Pre-allocated (and pre-touched) record arrays, so recording does not grow the node's RSS."""

    def __init__(self, rows: int, cols: int):
        self.a = np.full((rows, cols), np.nan)  # np.full writes every page now
        self.n = 0

    def add(self, *row) -> None:
        i = self.n
        if i < len(self.a):
            self.a[i] = row
            self.n = i + 1

    def tolist(self) -> list:
        return self.a[: self.n].tolist()


def frame_seq(msg) -> int:
    """The sequence number the publisher put in ``header.frame_id`` (-1 where there is none)."""
    try:
        return int(msg.header.frame_id)
    except ValueError:
        return -1


def stop_event() -> threading.Event:
    """An event that SIGINT and SIGTERM set: the process then writes its log and ends (also
    :mod:`bench.traffic`'s; this module imports nothing of ``bench.common``, which would grow the RSS of
    the node under test)."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _timed(fn, record):
    """``fn`` wrapped: after every call, ``record(args, wall time of the call, duration in ms)``."""
    def wrapper(*args, **kwargs):
        t = time.time()
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            record(args, t, (time.perf_counter_ns() - t0) * 1e-6)

    return wrapper


def _instrument(node, rec: dict) -> None:
    """Wrap, from outside: Engine.swap_head / Engine.infer (wall time, ms), PerceptionNode._process
    (seq, header stamp, wall time the inference thread took the frame, ms) and the image subscription
    callback (seq, wall time of arrival)."""
    def frame(args, t, ms):
        msg = args[0]
        rec['frames'].add(frame_seq(msg), msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, t, ms)

    node.engine.swap_head = _timed(node.engine.swap_head, lambda args, t, ms: rec['swaps'].add(t, ms))
    node.engine.infer = _timed(node.engine.infer, lambda args, t, ms: rec['infers'].add(t, ms))
    if 'batches' in rec:  # several cameras: (wall time, ms, frames) of every batched ONNX Runtime call
        node.engine.infer_many = _timed(node.engine.infer_many,
                                        lambda args, t, ms: rec['batches'].add(t, ms, len(args[0])))
    node._process = _timed(node._process, frame)
    for sub in node.subscriptions:
        if sub.topic_name.endswith('/image'):
            orig_cb = sub.callback

            def on_frame(msg, _cb=orig_cb):
                rec['arrivals'].add(frame_seq(msg), time.time())
                return _cb(msg)

            sub.callback = on_frame


def EchoNode():
    """A node that answers every frame at once (name ``perception``, same topics and input QoS)."""
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Classification

    class _Echo(Node):
        def __init__(self):
            super().__init__('perception')
            self.declare_parameter('qos_reliability', 'best_effort')
            rel = self.get_parameter('qos_reliability').value
            qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE if rel == 'reliable'
                             else ReliabilityPolicy.BEST_EFFORT)
            self.pub = self.create_publisher(Classification, '~/classification', 10)
            self.create_subscription(Image, 'image', self._on, qos)
            self.received = 0

        def _on(self, msg):
            self.received += 1
            self.pub.publish(Classification(header=msg.header))

        def stats(self):
            return {'received': self.received, 'processed': self.received, 'dropped': 0, 'rejected': 0}

    return _Echo()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = []
    if '--ros-args' in argv:
        i = argv.index('--ros-args')
        argv, ros_args = argv[:i], argv[i:]
    ap = argparse.ArgumentParser()
    ap.add_argument('--kind', choices=('student', 'naive', 'echo'), default='student')
    ap.add_argument('--stats-out', required=True)
    ap.add_argument('--ready-file', required=True)
    ap.add_argument('--naive-model', default='auto', help='naive baseline model: auto or teacher')
    ap.add_argument('--record-rows', type=int, default=40000, help='capacity of the per-frame records')
    a = ap.parse_args(argv)

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from edge_tl_ros.nodes.params import make_executor

    rclpy.init(args=['node_runner', *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    rows = a.record_rows
    rec = {'swaps': Records(1000, 2), 'infers': Records(rows, 2), 'frames': Records(rows, 4),
           'arrivals': Records(rows, 2), 'batches': Records(rows, 3)}
    if a.kind == 'student':
        from edge_tl_ros.nodes.perception_node import PerceptionNode

        node = PerceptionNode()
        _instrument(node, rec)
    elif a.kind == 'echo':
        node = EchoNode()
    else:
        from bench.naive_node import NaiveNode

        node = NaiveNode(model=a.naive_model)
    # the student as perception_node.main runs it; the naive node as tutorials do (rclpy.spin)
    executor = make_executor(node) if a.kind == 'student' else SingleThreadedExecutor()
    executor.add_node(node)
    stop = stop_event()
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    with open(a.ready_file, 'w') as f:
        f.write(str(time.time()))
    while not stop.wait(0.2):
        if not spinner.is_alive():
            break
    executor.shutdown(timeout_sec=2)
    stats = node.stats()
    stats.update({k: r.tolist() for k, r in rec.items()})
    with open(a.stats_out, 'w') as f:
        json.dump(stats, f)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
