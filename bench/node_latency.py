"""node_latency: camera header stamp -> classification receipt, student node vs a naive node.

Three processes on a ROS domain of their own (Fast DDS): the node under test (:mod:`bench.node_runner`:
``PerceptionNode``, or the tutorial-style :mod:`bench.naive_node`), a publisher of ``bgr8`` frames at
30 Hz (640x480 and 1280x720) and a receiver of the classifications. Latency = receipt wall time -
header stamp (publisher's wall time just before ``publish``; same machine, same clock), over frames
published after the warm-up. Also: output rate, the node's own ``dropped`` (from /diagnostics), CPU%
of the node process (psutil; 100 = one core).

    python -m bench.node_latency [--quick] [--bundle DIR] [--qos best_effort|reliable] [--results-dir D]
"""

from __future__ import annotations

import time

from bench import common

NAME = 'node_latency'
RESOLUTIONS = ((640, 480), (1280, 720))
CONTRAST_KEYS = ('latency', 'cpu_percent', 'stamp_to_inference_start_ms')
NAIVE_RECV = {'cls_topic': '/naive/classification', 'node_name': 'naive'}


def node_under_test(kind: str, wd, bundle: str, qos: str, naive_model: str, executor_threads: int):
    """(:mod:`bench.node_runner` arguments, receiver config) of the node of ``kind``."""
    if kind == 'student':
        params = {**common.perception_params(bundle, wd / 'state', qos), 'executor_threads': executor_threads}
        return common.node_args('student', params), common.PERCEPTION_RECV
    if kind == 'echo':
        return common.node_args('echo', {'qos_reliability': qos}), common.PERCEPTION_RECV
    return common.node_args('naive', None, '--naive-model', naive_model), NAIVE_RECV


def session(kind: str, bundle: str, width: int, height: int, rate: float, duration: float, warmup: float,
            qos: str, naive_model: str = 'auto', dds: str = 'default', executor_threads: int = 1) -> dict:
    wd = common.new_workdir(f'{NAME}_{kind}_{width}')
    node_argv, recv_cfg = node_under_test(kind, wd, bundle, qos, naive_model, executor_threads)
    res = common.stream_session(wd, node_argv, rate, duration + warmup, width, height, recv_cfg, dds,
                                settle_s=2.0 if kind == 'naive' else 1.2)
    s, j = common.session_summary(res, warmup)
    s.update(kind=kind, resolution=f'{width}x{height}', width=width, height=height, duration_s=duration,
             warmup_s=warmup, dds=dds)
    if kind == 'student':
        s['executor_threads'] = executor_threads
    if kind == 'naive':  # what the naive node says of itself
        s.update({f'naive_{k}': res['node'].get(k) for k in ('model', 'input_size', 'compute_p50_ms',
                                                              'compute_p99_ms')})
    s['_series'] = (j['stamps'][j['seq']] - j['stamps'][0], j['lat_ms'])
    return s


def plan(quick: bool) -> list[tuple]:
    """(kind, width, height, seconds, warm-up seconds, DDS profile, executor_threads) of each session.

    The headline runs use config/fastdds_large_shm.xml, which the launch file sets for the nodes (the
    default Fast DDS shared-memory segment cannot hold a 640x480 frame); one default-transport run each
    for the student and the echo node shows why.
    """
    if quick:  # code path only; 720p, the default transport and the executor contrast in full runs
        return [('student', 640, 480, 3, 1, 'large_shm', 1), ('naive', 640, 480, 4, 2, 'large_shm', 1)]
    return [('student', 640, 480, 20, 3, 'large_shm', 1),
            # contrast, right after the headline run: the node on a 3-thread MultiThreadedExecutor
            ('student', 640, 480, 20, 3, 'large_shm', 3),
            *[('student', w, h, 20, 3, 'large_shm', 1) for (w, h) in RESOLUTIONS if (w, h) != (640, 480)],
            ('student', 640, 480, 20, 3, 'default', 1),
            *[('echo', 640, 480, 15, 2, dds, 1) for dds in ('large_shm', 'default')],
            ('echo', 1280, 720, 15, 2, 'large_shm', 1),
            *[('naive', w, h, 20, 5, 'large_shm', 1) for (w, h) in RESOLUTIONS]]


def label(r: dict) -> str:
    return f'{r["kind"]} {r["resolution"]} {r["dds"]}' + (
        f' {r["executor_threads"]}thr' if r.get('executor_threads', 1) > 1 else '')


def run(args) -> dict:
    t_start = time.monotonic()
    bundle, binfo = common.resolve_bundle(args.bundle)
    rate = 30.0
    runs = []
    for kind, w, h, dur, warm, dds, ex in plan(args.quick):
        print(f'[{NAME}] {kind} {w}x{h} @ {rate:g} Hz, DDS {dds}, for {dur} s (+{warm} s warm-up)'
              + (f', executor_threads {ex}' if kind == 'student' else '') + ' ...', flush=True)
        runs.append(session(kind, str(bundle), w, h, rate, dur, warm, args.qos, args.naive_model, dds, ex))
    series = {label(r): r.pop('_series') for r in runs}

    def pick(kind, res='640x480', dds='large_shm', threads=1):
        return next((r for r in runs if r['kind'] == kind and r['resolution'] == res and r['dds'] == dds
                     and r.get('executor_threads', 1) == threads), None)

    st, nv, mt = pick('student'), pick('naive'), pick('student', threads=3)
    p50, p99 = st['latency']['p50_ms'], st['latency']['p99_ms']
    nv50 = nv['latency']['p50_ms'] if nv else None
    data = {
        'p50_ms': p50, 'p99_ms': p99, 'naive_p50_ms': nv50,
        'speedup_vs_naive': (nv50 / p50) if (nv50 and p50) else None,
        'drops': st['diag_dropped'] if st['diag_dropped'] is not None else st['node_dropped'],
        'headline': 'student vs naive at 640x480, 30 Hz, Fast DDS with config/fastdds_large_shm.xml (as the '
        'launch file ships it)',
        'transport_floor': {
            f'{res} {dds}': (pick('echo', res, dds) or {}).get('latency')
            for res, dds in (('640x480', 'default'), ('640x480', 'large_shm'), ('1280x720', 'large_shm'))
        },
        'executor_contrast_640': {
            'single_threaded': {k: st.get(k) for k in CONTRAST_KEYS},
            'multi_threaded_3': {k: mt.get(k) for k in CONTRAST_KEYS},
            'p50_ratio_multi_over_single': mt['latency']['p50_ms'] / p50 if p50 else None,
            'p99_ratio_multi_over_single': mt['latency']['p99_ms'] / p99 if p99 else None,
        } if mt else None,
        'default_transport_640': {k: (pick('student', dds='default') or {}).get(k)
                                  for k in ('latency', 'published', 'node_received', 'lost_before_node')},
        'targets': {'p50_ms<=5': p50 is not None and p50 <= 5, 'p99_ms<=10': p99 is not None and p99 <= 10,
                    'speedup>=10': bool(nv50 and p50 and nv50 / p50 >= 10)},
        'bundle': binfo, 'student_qos': args.qos, 'publisher_qos': 'reliable, depth 10', 'rate_hz': rate,
        'runs': runs,
        'definitions': {
            'latency': 'receipt wall time in the receiver process - header.stamp (publisher wall time just '
            'before publish); frames published after the warm-up only; lost frames have none',
            'drops': "the student node's own dropped_frames from its last /diagnostics message "
            '(frames replaced in the newest-frame slot before inference), 640x480 run',
            'lost_before_node': 'published - node received (lost in DDS/transport or DDS queue overwrite)',
            'dds': 'default = Fast DDS built-in transports (512 KiB shared-memory segment); large_shm = '
            'config/fastdds_large_shm.xml (16 MiB segment, 4 MiB UDP buffers) in all three processes',
            'stamp_to_inference_start_ms': 'header stamp -> the inference thread takes the frame (node side: '
            'transport + deserialisation + executor + slot wait)',
            'node_process_ms': 'PerceptionNode._process per frame (decode + infer + publish)',
            'transport_floor': 'latency of the echo node (same processes, QoS and topics; answers each '
            'frame at once, no inference): what DDS + rclpy cost a Python node for that frame size',
            'cpu_percent': 'node process CPU time / wall time over the measured window, 100 = one core',
            'node_infer_ms': 'Engine.infer (decode view + preprocess + ORT + head) inside the node',
            'speedup_vs_naive': 'naive_p50_ms / p50_ms (same run, same publisher, 640x480)',
            'executor_contrast_640': 'the headline run (executor_threads 1: SingleThreadedExecutor, the '
            'default) vs the same node with executor_threads:=3 (MultiThreadedExecutor), run right after it',
        },
    }
    rows = [{'run': label(r), 'p50_ms': r['latency']['p50_ms'], 'p99_ms': r['latency']['p99_ms'],
             'out_hz': r['output_rate_hz'], 'node_drop': r['node_dropped'], 'lost': r['lost_before_node'],
             'cpu%': r['cpu_percent'], 'to_node_p50': (r['stamp_to_inference_start_ms'] or {}).get('p50_ms'),
             'infer_p50': (r['node_infer_ms'] or {}).get('p50_ms')} for r in runs]
    plot(series, args)
    common.report(NAME, data, args, t_start, rows, title=f'bundle {binfo["name"]}')
    return data


def plot(series: dict, args) -> None:
    fig, axes = common.subplots(1, 2, figsize=(11, 4))
    for name, (t, lat) in series.items():
        if len(lat):
            common.plot_cdf(axes[0], lat, name)
            axes[1].plot(t, lat, '.', ms=2, label=name)
    axes[0].set(xscale='log', xlabel='stamp -> classification latency (ms, log)', ylabel='CDF')
    axes[0].legend(fontsize=8)
    axes[1].set(yscale='log', xlabel='time since first frame (s)', ylabel='latency (ms, log)')
    common.savefig(fig, NAME, args)


def add_args(p) -> None:
    common.add_qos_arg(p)
    p.add_argument('--naive-model', default='auto', choices=('auto', 'teacher'))


main = common.entry(NAME, run, __doc__, add_args)


if __name__ == '__main__':
    raise SystemExit(main())
