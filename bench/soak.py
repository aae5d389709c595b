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

import os
import time

import numpy as np

from bench import common

NAME = 'soak'
LABEL_EVERY = 10
SAMPLE_S = 2.0


def frames_and_labels(bundle_info: dict, n: int = 90, width: int = 640, height: int = 480, seed: int = 0):
    """``n`` BGR frames (width x height), their class names for the bundle, where they come from."""
    import cv2

    if not bundle_info['is_toy']:
        from edge_tl_ros.bundle import load_bundle

        frames, y = common.frames_for(width, height, n, seed, labels=True)  # LookupError: no data
        names = load_bundle(bundle_info['path']).class_names
        return frames, [names[int(k)] for k in y], 'GTSRB test images'
    from edge_tl_ros.toy import TOY_CLASSES, toy_frames

    imgs, y = toy_frames(np.random.default_rng(seed), n, shifted=True)
    big = [cv2.resize(im[..., ::-1], (width, height), interpolation=cv2.INTER_NEAREST) for im in imgs]
    return np.stack(big), [TOY_CLASSES[int(k)] for k in y], 'toy frames, colour-shifted (toy_frames)'


class Driver(common.Driver):
    """Camera + labeller + observer in this process (classifications, /diagnostics, adaptation status)."""

    def __init__(self, domain: int, frames: np.ndarray, names: list[str]):
        from diagnostic_msgs.msg import DiagnosticArray
        from vision_msgs.msg import Classification

        super().__init__('soak_driver', domain, image_depth=10, threads=2)
        self.msgs = self.image_messages(frames)
        self.names = names
        self.classified = 0
        self.cls_times: list[float] = []
        self.diag: dict[str, dict] = {}
        self.node.create_subscription(Classification, '/perception/classification', self._on_cls, 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 20)
        self.start()

    def _on_cls(self, msg):
        with self._lock:
            self.classified += 1
            self.cls_times.append(time.time())

    def _on_diag(self, msg):
        for st in msg.status:
            self.diag[st.name.split(':')[0]] = {kv.key: kv.value for kv in st.values}

    def ready(self) -> bool:
        """Both nodes subscribe image, the adaptation node labels, perception publishes, status seen."""
        return (self.pub.get_subscription_count() >= 2 and self.pub_lab.get_subscription_count() >= 1
                and self.node.count_publishers('/perception/classification') >= 1 and bool(self.status))

    def publish(self, seq: int) -> None:
        msg = self.msgs[seq % len(self.msgs)]
        common.stamp(msg.header, seq)
        self.pub.publish(msg)
        if seq % LABEL_EVERY == 0:
            self.pub_lab.publish(self.label(self.names[seq % len(self.msgs)], msg.header))


def growth(samples: list, t_warm: float) -> dict:
    """RSS / RssAnon / RssShmem / fd figures of one node's samples after the warm-up (medians of the first
    and the last 10 %)."""
    s = np.asarray([x for x in samples if x[0] >= t_warm])  # (t, cpu s, rss, anon, shm, fds)
    if len(s) < 2:
        return {'samples': int(len(s))}
    k = max(2, len(s) // 10)
    (rss0, rss1), (anon0, anon1), (shm0, shm1), (fd0, fd1) = (common.first_last(s[:, c], k)
                                                              for c in (2, 3, 4, 5))
    return {'samples': int(len(s)), 'rss_after_warmup_mb': rss0, 'rss_end_mb': rss1,
            'rss_growth_mb': rss1 - rss0, 'rss_anon_growth_mb': anon1 - anon0,
            'rss_shmem_growth_mb': shm1 - shm0, 'rss_anon_end_mb': anon1,
            'rss_anon_slope_mb_per_min': common.slope_per_min(s[:, 0], s[:, 3]),
            'rss_max_mb': float(s[:, 2].max()),
            'rss_slope_mb_per_min': common.slope_per_min(s[:, 0], s[:, 2]),
            'fds_after_warmup': int(fd0), 'fds_end': int(fd1), 'fd_growth': int(fd1 - fd0),
            'fds_max': int(s[:, 5].max()),
            'cpu_percent': float(100 * (s[-1, 1] - s[0, 1]) / max(1e-9, s[-1, 0] - s[0, 0]))}


def node_params(bundle, state_dir, period: float, store_max_entries: int | None) -> dict:
    """The parameters of both nodes (the one place this benchmark names them)."""
    shared = {'model_bundle': bundle, 'state_dir': state_dir}
    adaptation = {**shared, 'round.period_s': period, 'round.every_n_labels': 0}
    if store_max_entries:
        adaptation['store.max_entries'] = store_max_entries
    return {'perception': shared, 'adaptation': adaptation}


def bundle_and_frames(args):
    """(bundle, its info, frames, their class names, where they come from): the toy bundle when the
    student has no labelled frames here."""
    bundle, binfo = common.resolve_bundle(args.bundle)
    try:
        return bundle, binfo, *frames_and_labels(binfo)
    except LookupError as e:
        from edge_tl_ros.toy import make_toy_bundle

        bundle = make_toy_bundle(common.tmp_root() / f'toy32_soak_{os.getpid()}', size=32, name='toy32')
        _, binfo = common.resolve_bundle(str(bundle))
        binfo['note'] = f'{e}; using a toy bundle'
        return bundle, binfo, *frames_and_labels(binfo)


def drive(driver: Driver, procs: dict, mons: dict, rate: float, duration: float) -> tuple[int, int, float]:
    """The camera at ``rate`` Hz for ``duration`` s; (frames published, schedule resets, start time)."""
    t0 = time.time()
    seq, next_print = 0, t0 + 30
    pacer = common.Pacer(rate)  # a whole frame behind (machine busy): no burst to catch up
    while time.time() - t0 < duration:
        pacer.wait()
        driver.publish(seq)
        seq += 1
        if time.time() >= next_print:
            next_print += 30
            st = driver.status.get('round', {})
            print(f'[{NAME}] {time.time() - t0:5.0f} s: published {seq}, classified {driver.classified}, '
                  f'rounds {st.get("count")}, perception RSS '
                  f'{(mons["perception"].samples or [(0, 0, 0)])[-1][2]:.0f} MB', flush=True)
        for p in procs.values():
            p.check('died')
    return seq, pacer.resets, t0


def summarize(driver: Driver, procs: dict, mons: dict, seq: int, resets: int, t0: float, t_end: float,
              duration: float, period: float, args) -> dict:
    t_warm = t0 + max(10.0, 0.2 * duration)
    alive = {n: p.alive() for n, p in procs.items()}
    pd = driver.diag.get('/perception', {})
    status = driver.status
    by_node = {n: growth(m.samples, t_warm) for n, m in mons.items()}
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
        'rss_growth_mb': max(g.get('rss_growth_mb', float('inf')) for g in by_node.values()),
        'rss_anon_growth_mb': max(g.get('rss_anon_growth_mb', float('inf')) for g in by_node.values()),
        'fd_growth': max(g.get('fd_growth', 10**6) for g in by_node.values()),
        'rounds': rounds, 'rounds_accepted': int(status.get('head_version') or 0),
        'head_version_perception': int(pd.get('head_version', -1)),
        'last_round': {k: last.get(k) for k in ('accepted', 'reason', 'trigger')},
        'output_rate_hz_min_10s': min(per_bin) if per_bin else None,
        'output_rate_hz_mean': driver.classified / max(1e-9, t_end - t0),
        'publisher_schedule_resets': resets,
        'latency_p99_ms_last': float(pd['latency_p99_ms']) if 'latency_p99_ms' in pd else None,
        'store': {k: (status.get('store') or {}).get(k)
                  for k in ('entries', 'bytes', 'max_entries', 'dropped', 'evicted')},
        'adaptation_counters': status.get('counters'), 'labels_dropped': status.get('labels_dropped'),
        'nodes_alive_at_end': alive, 'by_node': by_node,
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
    return data


def run(args) -> dict:
    t_start = time.monotonic()
    common.stop_on_sigterm()  # the finally below stops the node processes
    duration = 60.0 if args.quick and args.duration is None else float(args.duration or 600.0)
    period = args.round_period or (20.0 if args.quick else 60.0)
    bundle, binfo, frames, names, source = bundle_and_frames(args)
    wd = common.new_workdir(NAME)
    env = common.ros_env(dds=args.dds)
    common.adopt_ros_env(env)
    procs = {name: common.Proc(['-m', f'edge_tl_ros.nodes.{name}_node', '--ros-args', *common.ros_params(p)],
                               env, wd / f'{name}.log', name)
             for name, p in node_params(bundle, wd / 'state', period, args.store_max_entries).items()}
    print(f'[{NAME}] {binfo["name"]}: {frames.shape[2]}x{frames.shape[1]} @ {args.rate:g} Hz for '
          f'{duration:g} s, a round every {period:g} s, label every {LABEL_EVERY}th frame', flush=True)
    driver = None
    try:
        driver = Driver(int(env['ROS_DOMAIN_ID']), frames, names)
        driver.wait_ready(driver.ready, procs.values(), 120)
        mons = {n: common.ProcMonitor(p.pid, SAMPLE_S, fds=True) for n, p in procs.items()}
        seq, resets, t0 = drive(driver, procs, mons, args.rate, duration)
        t_end = time.time()
        time.sleep(2.5)  # last classifications, one more diagnostics period
        for m in mons.values():
            m.stop(last_sample=False)
        data = summarize(driver, procs, mons, seq, resets, t0, t_end, duration, period, args)
        data.update({'bundle': binfo, 'frames': source, 'dds': args.dds,
                     'frame_size': [int(frames.shape[2]), int(frames.shape[1])]})
        _plot(args, mons, t0, np.asarray(driver.cls_times), t_end)
        rows = [{'node': n, 'rss_start_mb': g.get('rss_after_warmup_mb'), 'rss_end_mb': g.get('rss_end_mb'),
                 'rss_growth_mb': g.get('rss_growth_mb'), 'anon_growth_mb': g.get('rss_anon_growth_mb'),
                 'fds': g.get('fds_end'), 'fd_growth': g.get('fd_growth'), 'cpu%': g.get('cpu_percent')}
                for n, g in data['by_node'].items()]
        common.report(NAME, data, args, t_start, rows,
                      title=f'published {seq}, classified {data["classified"]}, dropped {data["dropped"]}, '
                      f'lost before node {data["lost_before_node"]}, unaccounted {data["unaccounted"]}, '
                      f'rounds {data["rounds"]} ({data["rounds_accepted"]} accepted), ok {data["ok"]}')
        return data
    finally:
        if driver is not None:
            driver.close()
        for p in procs.values():
            p.stop()


def _plot(args, mons, t0, cls_t, t_end) -> None:
    fig, axes = common.subplots(1, 3, figsize=(14, 3.8))
    for name, m in mons.items():
        s = np.asarray(m.samples)
        if len(s):
            axes[0].plot(s[:, 0] - t0, s[:, 2], label=f'{name} RSS')
            axes[0].plot(s[:, 0] - t0, s[:, 3], '--', label=f'{name} RssAnon')
            axes[1].plot(s[:, 0] - t0, s[:, 5], label=name)
    edges = np.arange(0, t_end - t0 + 1e-6, 5.0)
    counts, _ = np.histogram(cls_t - t0, edges)
    axes[2].step(edges[:-1], counts / 5.0, where='post')
    for ax, yl in zip(axes, ('RSS (MB)', 'open fds', 'classifications / s')):
        ax.set(xlabel='time (s)', ylabel=yl)
    axes[0].legend()
    axes[1].legend()
    common.savefig(fig, NAME, args)


def add_args(p) -> None:
    p.add_argument('--duration', type=float, default=None, help='seconds (default 600; 60 with --quick)')
    p.add_argument('--rate', type=float, default=30.0, help='camera frame rate (Hz)')
    p.add_argument('--round-period', type=float, default=None,
                   help='adapt_period_s of the adaptation node (default 60; 20 with --quick)')
    p.add_argument('--store-max-entries', type=int, default=None,
                   help='the adaptation node\'s store cap (default: its parameter default, 2000; the 10-min '
                        'run reaches it after ~8 min)')
    common.add_dds_arg(p, 'large_shm: the Fast DDS profile with a 16 MiB shared-memory segment (640x480 '
                          'frames reach the nodes); default: the shipped transports')


main = common.entry(NAME, run, __doc__, add_args, ok=lambda d: d.get('ok'))


if __name__ == '__main__':
    raise SystemExit(main())
