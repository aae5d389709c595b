"""soak: both nodes for a long time under a 30 Hz camera, labels, and an adaptation round every minute.

    python -m bench.soak [--duration 600] [--quick] [--rate 30] [--round-period 60] [--bundle DIR]
                         [--dds large_shm|default] [--results-dir D]

Three processes on a ROS domain of this run's own: ``perception_node`` and ``adaptation_node`` exactly as
``ros2 run`` starts them (``python -m edge_tl_ros.nodes.<node>``), and this driver, which publishes
640x480 ``bgr8`` frames on ``image`` at ``--rate`` (reliable, depth 10; the node subscribes with its
default sensor-data QoS), a label on ``labels`` for every 10th frame (the frame's stamp + its class),
receives ``perception/classification``, ``/diagnostics`` and ``adaptation/status``, and samples RSS and
open file descriptors of both nodes every 2 s (psutil). The adaptation node starts a round every
``--round-period`` s (``adapt_period_s``; ``adapt_every_n_labels`` 0), trains in its niced worker process
and hot-swaps accepted heads into the perception node.

Result (``bench/results/soak.json``; ``--quick``: 60 s, rounds every 20 s, ``bench/results/quick``):
``rss_growth_mb`` / ``rss_anon_growth_mb`` (heap only, without DDS shared-memory pages) /
``fd_growth`` (max over the two nodes of end - after warm-up; medians of the samples in
the first / last 10 % after the warm-up, warm-up = 20 % of the run, at least 10 s), ``published``,
``classified``, ``dropped`` (the perception node's own overload counter: frames replaced in its
newest-frame slot), ``rounds`` (+ accepted), and the accounting ``unaccounted = published - classified -
dropped - rejected - lost_before_node`` which must be 0: every frame is classified, or counted as
dropped/rejected by the node, or never reached it (``lost_before_node`` = published - node frames_in,
DDS). ``ok`` = both nodes alive to the end, rounds ran, fd growth <= 2, RSS growth < 20 MB, unaccounted 0.
The default bundle is models/gtsrb_student when present (frames + labels from the GTSRB test set, or a
toy bundle when either is missing: shifted toy frames, so the first round has something to fix).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

from bench import common

NAME = 'soak'
LABEL_EVERY = 10
SAMPLE_S = 2.0


def frames_and_labels(bundle_info: dict, n: int = 90, width: int = 640, height: int = 480, seed: int = 0):
    """``n`` BGR frames (width x height) and their class names for the bundle."""
    import cv2

    rng = np.random.default_rng(seed)
    if not bundle_info['is_toy']:
        try:
            from edge_tl_ros.data import find_gtsrb_npz

            with np.load(find_gtsrb_npz(), allow_pickle=False) as z:
                x, y = z['X_test'], z['y_test']
            idx = rng.choice(len(x), n, replace=False)
            from edge_tl_ros.bundle import load_bundle

            names = load_bundle(bundle_info['path']).class_names
            imgs = [cv2.resize(x[i][..., ::-1], (width, height), interpolation=cv2.INTER_LINEAR) for i in idx]
            return np.stack(imgs), [names[int(y[i])] for i in idx], 'GTSRB test images'
        except Exception as e:  # no data: labels would be meaningless, so the caller switches to the toy
            raise LookupError(f'no labelled frames for {bundle_info["name"]}: {e}') from e
    from edge_tl_ros.toy import TOY_CLASSES, toy_frames

    imgs, y = toy_frames(rng, n, shifted=True)
    big = [cv2.resize(im[..., ::-1], (width, height), interpolation=cv2.INTER_NEAREST) for im in imgs]
    return np.stack(big), [TOY_CLASSES[int(k)] for k in y], 'toy frames, colour-shifted (toy_frames)'


class Driver:
    """Camera + labeller + observer in this process."""

    def __init__(self, ctx_domain: int, frames: np.ndarray, names: list[str]):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
        from vision_msgs.msg import Classification, ObjectHypothesis

        from edge_tl_ros.imaging import image_fields

        from rclpy.context import Context
        from rclpy.signals import SignalHandlerOptions

        self.ctx = Context()
        # Ctrl-C / SIGTERM must reach run()'s finally (which stops the node processes), not only rclpy
        rclpy.init(context=self.ctx, domain_id=ctx_domain, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node('soak_driver', context=self.ctx)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub = self.node.create_publisher(Image, 'image', qos)
        self.pub_lab = self.node.create_publisher(Classification, 'labels', QoSProfile(
            depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.msgs = [Image(**image_fields(f, 'bgr8')) for f in frames]
        self.labels = [Classification(results=[ObjectHypothesis(class_id=n, score=1.0)]) for n in names]
        self.classified = 0
        self.cls_times: list[float] = []
        self.diag: dict[str, dict] = {}
        self.status: dict = {}
        self._lock = threading.Lock()
        self.node.create_subscription(Classification, '/perception/classification', self._on_cls, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 20)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(String, '/adaptation/status', self._on_status, latched)
        self.ex = MultiThreadedExecutor(num_threads=2, context=self.ctx)
        self.ex.add_node(self.node)
        self._spin = threading.Thread(target=self.ex.spin, daemon=True)
        self._spin.start()

    def _on_cls(self, msg):
        with self._lock:
            self.classified += 1
            self.cls_times.append(time.monotonic())

    def _on_diag(self, msg):
        for st in msg.status:
            self.diag[st.name.split(':')[0]] = {kv.key: kv.value for kv in st.values}

    def _on_status(self, msg):
        self.status = json.loads(msg.data)

    def wait_ready(self, timeout: float, procs) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pub.get_subscription_count() >= 2 and self.pub_lab.get_subscription_count() >= 1 \
                    and self.node.count_publishers('/perception/classification') >= 1 and self.status:
                time.sleep(0.5)
                return
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f'{p.name} exited (rc {p.p.returncode}):\n{p.tail()}')
            time.sleep(0.1)
        raise RuntimeError('nodes not ready')

    def publish(self, seq: int) -> None:
        msg = self.msgs[seq % len(self.msgs)]
        t = time.time()
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(t), int((t % 1) * 1e9)
        msg.header.frame_id = str(seq)
        self.pub.publish(msg)
        if seq % LABEL_EVERY == 0:
            lab = self.labels[seq % len(self.msgs)]
            lab.header = msg.header
            self.pub_lab.publish(lab)

    def close(self) -> None:
        self.ex.shutdown(timeout_sec=2)
        self.node.destroy_node()
        self.ctx.try_shutdown()


def _rss_split(pid: int) -> tuple[float, float]:
    """(RssAnon, RssShmem) in MB from /proc: heap/stacks (what a leak grows) and DDS shared-memory pages."""
    anon = shm = float('nan')
    try:
        for line in open(f'/proc/{pid}/status'):
            if line.startswith('RssAnon:'):
                anon = int(line.split()[1]) / 1024
            elif line.startswith('RssShmem:'):
                shm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return anon, shm


class Sampler:
    """RSS, RssAnon, RssShmem (MB) and open fds of the node processes every SAMPLE_S seconds."""

    def __init__(self, procs: dict):
        import psutil

        self.ps = {name: psutil.Process(p.pid) for name, p in procs.items()}
        self.samples = {name: [] for name in procs}  # (monotonic t, rss MB, fds, cpu s, anon MB, shm MB)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            for name, p in self.ps.items():
                try:
                    ct = p.cpu_times()
                    self.samples[name].append((time.monotonic(), p.memory_info().rss / 2**20, p.num_fds(),
                                               ct.user + ct.system, *_rss_split(p.pid)))
                except Exception:  # the process died: the result says so
                    pass
            self._stop.wait(SAMPLE_S)

    def stop(self):
        self._stop.set()
        self._t.join(5)

    def growth(self, name: str, t_warm: float) -> dict:
        s = np.asarray([x for x in self.samples[name] if x[0] >= t_warm])
        if len(s) < 2:
            return {'samples': int(len(s))}
        k = max(2, len(s) // 10)
        slope = float(np.polyfit((s[:, 0] - s[0, 0]) / 60.0, s[:, 1], 1)[0]) if len(s) > 3 else None
        dt = max(1e-9, s[-1, 0] - s[0, 0])
        return {'samples': int(len(s)), 'rss_after_warmup_mb': float(np.median(s[:k, 1])),
                'rss_end_mb': float(np.median(s[-k:, 1])),
                'rss_growth_mb': float(np.median(s[-k:, 1]) - np.median(s[:k, 1])),
                'rss_anon_growth_mb': float(np.median(s[-k:, 4]) - np.median(s[:k, 4])),
                'rss_shmem_growth_mb': float(np.median(s[-k:, 5]) - np.median(s[:k, 5])),
                'rss_anon_end_mb': float(np.median(s[-k:, 4])),
                'rss_anon_slope_mb_per_min': (float(np.polyfit((s[:, 0] - s[0, 0]) / 60.0, s[:, 4], 1)[0])
                                              if len(s) > 3 else None),
                'rss_max_mb': float(s[:, 1].max()), 'rss_slope_mb_per_min': slope,
                'fds_after_warmup': int(np.median(s[:k, 2])), 'fds_end': int(np.median(s[-k:, 2])),
                'fd_growth': int(np.median(s[-k:, 2]) - np.median(s[:k, 2])), 'fds_max': int(s[:, 2].max()),
                'cpu_percent': float(100 * (s[-1, 3] - s[0, 3]) / dt)}


def run(args) -> dict:
    t_start = time.monotonic()
    duration = 60.0 if args.quick and args.duration is None else float(args.duration or 600.0)
    period = args.round_period or (20.0 if args.quick else 60.0)
    bundle, binfo = common.resolve_bundle(args.bundle)
    try:
        frames, names, source = frames_and_labels(binfo)
    except LookupError as e:
        from edge_tl_ros.toy import make_toy_bundle

        note = f'{e}; using a toy bundle'
        bundle = make_toy_bundle(common.tmp_root() / f'toy32_soak_{os.getpid()}', size=32, name='toy32')
        _, binfo = common.resolve_bundle(str(bundle))
        binfo['note'] = note
        frames, names, source = frames_and_labels(binfo)
    wd = common.new_workdir(NAME)
    env = common.ros_env(dds=args.dds)
    for k in ('RMW_IMPLEMENTATION', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'FASTDDS_DEFAULT_PROFILES_FILE',
              'FASTRTPS_DEFAULT_PROFILES_FILE'):
        if k in env:
            os.environ[k] = env[k]
    state = wd / 'state'
    common_p = ['-p', f'model_bundle:={bundle}', '-p', f'state_dir:={state}']
    perc = common.Proc(['-m', 'edge_tl_ros.nodes.perception_node', '--ros-args', *common_p],
                       env, wd / 'perception.log', 'perception')
    adapt = common.Proc(['-m', 'edge_tl_ros.nodes.adaptation_node', '--ros-args', *common_p,
                         '-p', f'adapt_period_s:={period}', '-p', 'adapt_every_n_labels:=0',
                         *(['-p', f'store_max_entries:={args.store_max_entries}'] if args.store_max_entries
                           else [])],
                        env, wd / 'adaptation.log', 'adaptation')
    procs = {'perception': perc, 'adaptation': adapt}
    print(f'[{NAME}] {binfo["name"]}: {frames.shape[2]}x{frames.shape[1]} @ {args.rate:g} Hz for '
          f'{duration:g} s, a round every {period:g} s, label every {LABEL_EVERY}th frame', flush=True)
    driver = None
    try:
        driver = Driver(int(env['ROS_DOMAIN_ID']), frames, names)
        driver.wait_ready(120, procs.values())
        sampler = Sampler(procs)
        t0 = time.monotonic()
        t_warm = t0 + max(10.0, 0.2 * duration)
        seq, next_t, resets, next_print = 0, time.perf_counter(), 0, t0 + 30
        dt = 1.0 / args.rate
        while time.monotonic() - t0 < duration:
            now = time.perf_counter()
            if next_t > now:
                time.sleep(next_t - now)
            elif now - next_t > dt:  # fell a whole frame behind (machine busy): no burst to catch up
                resets += 1
                next_t = now
            driver.publish(seq)
            seq += 1
            next_t += dt
            if time.monotonic() >= next_print:
                next_print += 30
                st = driver.status.get('round', {})
                print(f'[{NAME}] {time.monotonic() - t0:5.0f} s: published {seq}, classified '
                      f'{driver.classified}, rounds {st.get("count")}, perception RSS '
                      f'{(sampler.samples["perception"] or [(0, 0)])[-1][1]:.0f} MB', flush=True)
            for p in procs.values():
                if not p.alive():
                    raise RuntimeError(f'{p.name} died (rc {p.p.returncode}):\n{p.tail()}')
        t_end = time.monotonic()
        time.sleep(2.5)  # last classifications, one more diagnostics period
        sampler.stop()
        alive = {n: p.alive() for n, p in procs.items()}
        pd = driver.diag.get('/perception', {})
        status = driver.status
        growth = {n: sampler.growth(n, t_warm) for n in procs}
        cls_t = np.asarray(driver.cls_times)
        bins = np.arange(t0, t_end - 10.0 + 1e-6, 10.0)  # whole 10-s bins of the run (not the settle time)
        per_bin = [int(((cls_t >= b) & (cls_t < b + 10)).sum()) / 10.0 for b in bins]
        frames_in = int(pd.get('frames_in', 0))
        dropped, rejected = int(pd.get('dropped_frames', 0)), int(pd.get('rejected_frames', 0))
        last = (status.get('round') or {}).get('last') or {}
        rounds = int((status.get('round') or {}).get('count', 0))
        data = {
            'duration_s': duration, 'rate_hz': args.rate, 'round_period_s': period,
            'published': seq, 'classified': driver.classified, 'dropped': dropped, 'rejected': rejected,
            'node_frames_in': frames_in, 'node_frames_out': int(pd.get('frames_out', 0)),
            'lost_before_node': seq - frames_in,
            'unaccounted': seq - driver.classified - dropped - rejected - (seq - frames_in),
            'rss_growth_mb': max(g.get('rss_growth_mb', float('inf')) for g in growth.values()),
            'rss_anon_growth_mb': max(g.get('rss_anon_growth_mb', float('inf')) for g in growth.values()),
            'fd_growth': max(g.get('fd_growth', 10**6) for g in growth.values()),
            'rounds': rounds,
            'rounds_accepted': int(status.get('head_version') or 0),
            'head_version_perception': int(pd.get('head_version', -1)),
            'last_round': {k: last.get(k) for k in ('accepted', 'reason', 'trigger')},
            'output_rate_hz_min_10s': min(per_bin) if per_bin else None,
            'output_rate_hz_mean': driver.classified / max(1e-9, t_end - t0),
            'publisher_schedule_resets': resets,
            'latency_p99_ms_last': float(pd['latency_p99_ms']) if 'latency_p99_ms' in pd else None,
            'store': {k: (status.get('store') or {}).get(k) for k in ('entries', 'bytes', 'max_entries',
                                                                      'dropped', 'evicted')},
            'adaptation_counters': status.get('counters'),
            'labels_dropped': status.get('labels_dropped'),
            'nodes_alive_at_end': alive,
            'by_node': growth,
            'bundle': binfo, 'frames': source, 'frame_size': [int(frames.shape[2]), int(frames.shape[1])],
            'dds': args.dds,
            'definitions': {
                'rss_growth_mb': 'max over both nodes of median RSS over the last 10% of 2-s samples minus '
                                 'the median over the first 10% after the warm-up (20% of the run, >= 10 s)',
                'rss_anon_growth_mb': 'the same for RssAnon (heap, stacks: what a leak grows); the rest of '
                                      'RSS is mostly DDS shared-memory pages (RssShmem) touched over time',
                'fd_growth': 'the same for the number of open file descriptors',
                'dropped': "perception's own count of frames replaced in its newest-frame slot (overload)",
                'unaccounted': 'published - classified - dropped - rejected - lost_before_node (must be 0)',
                'rounds_accepted': 'the adaptation node head version at the end (each accepted round +1)',
            },
        }
        data['ok'] = bool(all(alive.values()) and rounds >= max(1, int(duration // period) - 1)
                          and data['fd_growth'] <= 2 and data['rss_growth_mb'] < 20
                          and data['unaccounted'] == 0 and data['classified'] > 0)
        _plot(args, sampler, procs, t0, cls_t, t_end)
        path = common.write_result(NAME, data, args, t_start)
        common.print_table(
            [{'node': n, 'rss_start_mb': g.get('rss_after_warmup_mb'), 'rss_end_mb': g.get('rss_end_mb'),
              'rss_growth_mb': g.get('rss_growth_mb'), 'anon_growth_mb': g.get('rss_anon_growth_mb'),
              'fds': g.get('fds_end'), 'fd_growth': g.get('fd_growth'), 'cpu%': g.get('cpu_percent')}
             for n, g in growth.items()],
            ['node', 'rss_start_mb', 'rss_end_mb', 'rss_growth_mb', 'anon_growth_mb', 'fds', 'fd_growth',
             'cpu%'],
            title=f'{NAME}: published {seq}, classified {driver.classified}, dropped {dropped}, '
                  f'lost before node {seq - frames_in}, unaccounted {data["unaccounted"]}, rounds {rounds} '
                  f'({data["rounds_accepted"]} accepted), ok {data["ok"]}')
        print(f'[{NAME}] wrote {path}')
        return data
    finally:
        if driver is not None:
            driver.close()
        for p in procs.values():
            p.stop()


def _plot(args, sampler, procs, t0, cls_t, t_end) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name in procs:
        s = np.asarray(sampler.samples[name])
        if len(s):
            axes[0].plot(s[:, 0] - t0, s[:, 1], label=f'{name} RSS')
            axes[0].plot(s[:, 0] - t0, s[:, 4], '--', label=f'{name} RssAnon')
            axes[1].plot(s[:, 0] - t0, s[:, 2], label=name)
    edges = np.arange(0, t_end - t0 + 1e-6, 5.0)
    counts, _ = np.histogram(cls_t - t0, edges)
    axes[2].step(edges[:-1], counts / 5.0, where='post')
    for ax, yl in zip(axes, ('RSS (MB)', 'open fds', 'classifications / s')):
        ax.set_xlabel('time (s)')
        ax.set_ylabel(yl)
    axes[0].legend()
    axes[1].legend()
    common.savefig(fig, NAME, args)


def main(argv=None) -> int:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument('--duration', type=float, default=None, help='seconds (default 600; 60 with --quick)')
    p.add_argument('--rate', type=float, default=30.0, help='camera frame rate (Hz)')
    p.add_argument('--round-period', type=float, default=None,
                   help='adapt_period_s of the adaptation node (default 60; 20 with --quick)')
    p.add_argument('--store-max-entries', type=int, default=None,
                   help='the adaptation node\'s store cap (default: its parameter default, 2000; the 10-min '
                        'run reaches it after ~8 min)')
    p.add_argument('--dds', choices=tuple(common.DDS_PROFILES), default='large_shm',
                   help='large_shm: the Fast DDS profile with a 16 MiB shared-memory segment (640x480 frames '
                        'reach the nodes); default: the shipped transports')
    args = p.parse_args(argv)
    import signal

    def _term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)  # run()'s finally stops the node processes
    d = run(args)
    return 0 if d.get('ok') else 1


if __name__ == '__main__':
    raise SystemExit(main())
