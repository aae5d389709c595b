"""Camera publisher and classification receiver processes of the node benchmarks.

    python -m bench.traffic CONFIG.json

``role: pub``: publishes ``frames_npy`` (BGR frames, cycled) as sensor_msgs/Image ``bgr8`` on ``image`` at
``rate_hz`` for ``duration_s``. Each frame's header stamp is the wall time (``time.time()``) just before
``publish``; ``header.frame_id`` is its sequence number. Messages are built once and only their header
changes, so publishing costs what a camera driver's publish costs. Writes ``{stamp: [...], ...}``.

``role: recv``: subscribes the node's classification topic and ``/diagnostics``; records (seq, wall
time of receipt) for every classification. With ``swap`` in the config it also runs the head-swap
schedule of the ``swap`` benchmark: ``HeadRegistry.add`` (alternating two heads) + ``~/reload_head``.
Stops and writes its log on SIGINT.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from bench import common
from bench.node_runner import frame_seq, stop_event


def _qos(reliability: str, depth: int):
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, durability=DurabilityPolicy.VOLATILE,
                      reliability=(ReliabilityPolicy.RELIABLE if reliability == 'reliable'
                                   else ReliabilityPolicy.BEST_EFFORT))


def run_pub(cfg: dict, node) -> dict:
    import numpy as np
    from sensor_msgs.msg import Image

    from edge_tl_ros.imaging import image_fields

    frames = np.load(cfg['frames_npy'])
    topics = cfg.get('topics') or [cfg.get('topic', 'image')]  # several: one camera each, same tick
    msgs = [[Image(**image_fields(f, 'bgr8')) for f in frames] for _ in topics]
    pubs = [node.create_publisher(Image, t, _qos(cfg.get('qos', 'reliable'), int(cfg.get('depth', 10))))
            for t in topics]
    if not common.wait_until(lambda: all(p.get_subscription_count() >= 1 for p in pubs), 60, poll_s=0.02):
        raise RuntimeError(f'no subscriber on the image topic(s) {topics} after 60 s')
    time.sleep(0.3)  # let discovery settle on the reader side too
    rate = float(cfg['rate_hz'])
    n = int(round(float(cfg['duration_s']) * rate))
    stamps, pub_ms = [[] for _ in topics], []
    pacer = common.Pacer(rate)
    for seq in range(n):
        pacer.wait()
        for k, pub in enumerate(pubs):
            msg = msgs[k][seq % len(frames)]
            t_stamp = common.stamp(msg.header, seq)
            t0 = time.perf_counter()
            pub.publish(msg)
            pub_ms.append((time.perf_counter() - t0) * 1e3)
            stamps[k].append(t_stamp)
    time.sleep(0.2)
    span = stamps[0][-1] - stamps[0][0] if len(stamps[0]) > 1 else 0.0
    out = {'stamp': stamps[0], 'publish_ms': pub_ms, 'n': n, 'rate_hz': rate,
           'achieved_rate_hz': (len(stamps[0]) - 1) / span if span > 0 else None,
           'schedule_resets': pacer.resets, 'width': int(frames.shape[2]), 'height': int(frames.shape[1])}
    if len(topics) > 1:
        out['stamps_by_topic'] = dict(zip(topics, stamps))
    return out


class Receiver:
    def __init__(self, node, cfg: dict):
        from diagnostic_msgs.msg import DiagnosticArray
        from vision_msgs.msg import Classification

        self.node = node
        self.cfg = cfg
        self.seq, self.t = [], []
        self.diag = []  # (time, {key: value}) of the node's status
        self.swaps = []
        self.swap_start = self.swap_end = None
        self.node_name = cfg.get('node_name', 'perception')
        node.create_subscription(Classification, cfg['cls_topic'], self._on_cls, 100)
        # more classification topics (several cameras / nodes): (seq, receipt time) per topic
        self.by_topic = {t: ([], []) for t in cfg.get('cls_topics', [])}
        for t, (seqs, times) in self.by_topic.items():
            node.create_subscription(Classification, t, lambda m, s=seqs, ts=times: (
                ts.append(time.time()), s.append(frame_seq(m))), 100)
        node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 10)

    def _on_cls(self, msg):
        t = time.time()
        self.seq.append(frame_seq(msg))
        self.t.append(t)

    def _on_diag(self, msg):
        t = time.time()
        for st in msg.status:
            if self.node_name in st.name:
                self.diag.append((t, {kv.key: kv.value for kv in st.values}))
        del self.diag[:-50]

    def swap_loop(self, stop: threading.Event):
        """After ``no_swap_s`` of classifications: ``n`` swaps every ``period_s`` (alternating heads)."""
        import numpy as np
        from std_srvs.srv import Trigger

        from edge_tl_ros.bundle import Head, HeadRegistry, load_bundle

        sw = self.cfg['swap']
        bundle = load_bundle(sw['bundle'])
        reg = HeadRegistry(bundle, sw['state_dir'])
        h0 = bundle.head
        heads = [Head(h0.weight * np.float32(1.001), h0.bias, h0.class_names),
                 Head(h0.weight, h0.bias + np.float32(1e-3), h0.class_names)]
        cli = self.node.create_client(Trigger, sw.get('service', '/perception/reload_head'))
        if not cli.wait_for_service(timeout_sec=30):
            raise RuntimeError('reload_head service not available')
        while not self.t and not stop.is_set():
            time.sleep(0.01)
        stop.wait(float(sw['no_swap_s']))
        self.swap_start = time.time()
        for i in range(int(sw['n'])):
            if stop.is_set():
                break
            t0 = time.time()
            reg.add(heads[i % 2], metrics={'bench': 'swap'})
            t1 = time.time()
            fut = cli.call_async(Trigger.Request())
            deadline = time.monotonic() + 10
            while not fut.done() and time.monotonic() < deadline:
                time.sleep(0.0005)
            t2 = time.time()
            r = fut.result() if fut.done() else None
            self.swaps.append({'t_add': t0, 't_call': t1, 't_done': t2, 'success': bool(r and r.success),
                               'message': r.message if r else 'timeout'})
            stop.wait(max(0.0, float(sw['period_s']) - (time.time() - t0)))
        self.swap_end = time.time()

    def result(self) -> dict:
        last = self.diag[-1][1] if self.diag else {}
        return {'seq': self.seq, 't': self.t, 'diag_last': last, 'diag_count': len(self.diag),
                'by_topic': {t: {'seq': s, 't': ts} for t, (s, ts) in self.by_topic.items()},
                'swaps': self.swaps, 'swap_start': self.swap_start, 'swap_end': self.swap_end}


def main(argv=None) -> int:
    cfg = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(f'bench_{cfg["role"]}')
    stop = stop_event()
    if cfg['role'] == 'pub':
        out = run_pub(cfg, node)
    else:
        recv = Receiver(node, cfg)
        ex = SingleThreadedExecutor()
        ex.add_node(node)
        swapper = (threading.Thread(target=recv.swap_loop, args=(stop,), daemon=True) if cfg.get('swap')
                   else None)
        deadline = time.monotonic() + 60
        while (min(node.count_publishers(t) for t in [cfg['cls_topic'], *cfg.get('cls_topics', [])]) < 1
               and time.monotonic() < deadline):
            ex.spin_once(timeout_sec=0.05)
        if swapper:
            swapper.start()
        Path(cfg['ready']).write_text(str(time.time()))
        while not stop.is_set():
            ex.spin_once(timeout_sec=0.05)
        if swapper:
            swapper.join(5)
        out = recv.result()
    common.write_json(cfg['out'], out)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
