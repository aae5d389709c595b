"""The node under test, in its own process: ``PerceptionNode`` (as ``perception_node.main`` runs it) or
the naive baseline (:mod:`bench.naive_node`).

    python -m bench.node_runner --kind student --stats-out S.json --ready-file R \
        --ros-args -p model_bundle:=models/gtsrb_student -p qos_reliability:=best_effort

Same executor as ``perception_node.main`` (MultiThreadedExecutor, 3 threads). The benchmark adds
instrumentation only from outside the node: ``Engine.swap_head`` and ``Engine.infer`` are wrapped to
record (wall time, duration) of every call, and ``PerceptionNode._process`` (the inference thread's
per-frame work) to record when each frame left the slot. On SIGINT it writes ``node.stats()`` plus
those records to ``--stats-out``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def _instrument(engine, swaps: list, infers: list) -> None:
    orig_swap, orig_infer = engine.swap_head, engine.infer

    def swap_head(head):
        t = time.time()
        t0 = time.perf_counter_ns()
        try:
            return orig_swap(head)
        finally:
            swaps.append((t, (time.perf_counter_ns() - t0) * 1e-6))

    def infer(img, order, roi=None):
        t = time.time()
        t0 = time.perf_counter_ns()
        try:
            return orig_infer(img, order, roi)
        finally:
            infers.append((t, (time.perf_counter_ns() - t0) * 1e-6))

    engine.swap_head = swap_head
    engine.infer = infer


def _instrument_process(node, frames: list) -> None:
    """Record (frame_id, header stamp, wall time the inference thread took the frame, duration ms)."""
    orig = node._process

    def process(msg, t_in):
        t = time.time()
        t0 = time.perf_counter_ns()
        try:
            return orig(msg, t_in)
        finally:
            st = msg.header.stamp
            frames.append(
                (msg.header.frame_id, st.sec + st.nanosec * 1e-9, t, (time.perf_counter_ns() - t0) * 1e-6)
            )

    node._process = process


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = []
    if '--ros-args' in argv:
        i = argv.index('--ros-args')
        argv, ros_args = argv[:i], argv[i:]
    ap = argparse.ArgumentParser()
    ap.add_argument('--kind', choices=('student', 'naive'), default='student')
    ap.add_argument('--stats-out', required=True)
    ap.add_argument('--ready-file', required=True)
    ap.add_argument('--naive-model', default='auto', help='naive baseline model: auto, teacher, mobilenet_v3')
    a = ap.parse_args(argv)

    import threading

    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=['node_runner', *ros_args], signal_handler_options=SignalHandlerOptions.NO)
    swaps, infers, frames = [], [], []
    if a.kind == 'student':
        from edge_tl_ros.nodes.perception_node import PerceptionNode

        node = PerceptionNode()
        _instrument(node.engine, swaps, infers)
        _instrument_process(node, frames)
    else:
        from bench.naive_node import NaiveNode

        node = NaiveNode(model=a.naive_model)
    # the student as perception_node.main runs it; the naive node as tutorials do (rclpy.spin)
    executor = MultiThreadedExecutor(num_threads=3) if a.kind == 'student' else SingleThreadedExecutor()
    executor.add_node(node)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    with open(a.ready_file, 'w') as f:
        f.write(str(time.time()))
    while not stop.wait(0.2):
        if not spinner.is_alive():
            break
    executor.shutdown(timeout_sec=2)
    stats = node.stats()
    stats['swaps'] = swaps
    stats['infers'] = infers
    stats['frames'] = frames
    with open(a.stats_out, 'w') as f:
        json.dump(stats, f)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
