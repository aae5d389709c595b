"""cameras: the cost of each extra camera, one perception node for N cameras vs one node per camera.

Each session runs on a ROS domain of its own (Fast DDS, the large shared-memory profile the launch file
sets): the node(s) under test (:mod:`bench.node_runner`, ``PerceptionNode`` as ``perception_node.main``
runs it), one publisher process that sends a ``bgr8`` 640x480 frame on every camera topic at 30 Hz (same
tick, as synchronised cameras do), and a receiver of every camera's classifications.

- ``one_node``: one node with ``cameras: [cam0 .. camN-1]``: one model, one inference thread; the newest
  frame of every camera goes through one batched ONNX Runtime call.
- ``per_camera``: N single-camera nodes (N processes, N models), what a user gets without the parameter.

Reported per session: CPU% of the node process(es) (psutil; 100 = one core), CPU ms per classified
frame, RSS of the node process(es), stamp -> receipt latency p50/p99 over every camera, output rate per
camera, frames lost or dropped, mean frames per ONNX Runtime call. Ratios are measured side by side in
one run: ``cpu_ms_per_extra_camera`` (one node: (CPU at N - CPU at 1) / (N - 1), in ms per camera-frame)
and ``rss_mb_per_extra_camera`` for both layouts.

    python -m bench.cameras [--quick] [--bundle DIR] [--results-dir D]
"""

from __future__ import annotations

import json
import time

import numpy as np

from bench import common

NAME = 'cameras'
RATE_HZ = 30.0
WIDTH, HEIGHT = 640, 480


def _node_argv(wd, bundle, k: int | None, n_cams: int) -> list[str]:
    """node_runner arguments: camera ``k`` alone (per_camera) or all ``n_cams`` cameras (k None)."""
    params = {**common.perception_params(bundle, wd / f'state{k if k is not None else ""}', 'best_effort')}
    if k is None:
        params['cameras'] = '[' + ','.join(f'cam{i}' for i in range(n_cams)) + ']'
        return common.node_args('student', params)
    return [*common.node_args('student', params), '-r', f'image:=/cam{k}/image',
            '-r', f'__node:=perception{k}']


def session(layout: str, n_cams: int, bundle, seconds: float, warmup: float) -> dict:
    wd = common.new_workdir(f'{NAME}_{layout}_{n_cams}')
    env = common.ros_env(dds='large_shm')
    np.save(wd / 'frames.npy', common.frames_for(WIDTH, HEIGHT))
    topics = [f'/cam{i}/image' for i in range(n_cams)]
    if layout == 'one_node':
        cls = [f'/perception/cam{i}/classification' for i in range(n_cams)]
        argvs = [_node_argv(wd, bundle, None, n_cams)]
    else:
        cls = [f'/perception{i}/classification' for i in range(n_cams)]
        argvs = [_node_argv(wd, bundle, i, n_cams) for i in range(n_cams)]
    procs, nodes, monitors = [], [], []
    try:
        for i, argv in enumerate(argvs):
            nodes.append(common.Proc(['-m', 'bench.node_runner', '--stats-out', str(wd / f'node{i}.json'),
                                      '--ready-file', str(wd / f'node{i}.ready'), *argv], env,
                                     wd / f'node{i}.log', f'node{i}'))
        procs += nodes
        for i, node in enumerate(nodes):
            if not common.wait_until((wd / f'node{i}.ready').exists, 120, procs):
                raise RuntimeError(f'node {i} did not start in 120 s:\n{node.tail()}')
            monitors.append(common.ProcMonitor(node.pid))

        def traffic(role, cfg):
            (wd / f'{role}.json.cfg').write_text(json.dumps(dict(cfg, role=role)))
            return common.Proc(['-m', 'bench.traffic', str(wd / f'{role}.json.cfg')], env, wd / f'{role}.log',
                               role)
        recv = traffic('recv', {'cls_topic': cls[0], 'cls_topics': cls, 'node_name': 'perception',
                                'out': str(wd / 'recv.json'), 'ready': str(wd / 'recv.ready')})
        procs.append(recv)
        if not common.wait_until((wd / 'recv.ready').exists, 60, procs):
            raise RuntimeError(f'receiver not ready in 60 s:\n{recv.tail()}')
        pub = traffic('pub', {'frames_npy': str(wd / 'frames.npy'), 'rate_hz': RATE_HZ, 'topics': topics,
                              'duration_s': seconds + warmup, 'qos': 'reliable', 'depth': 10,
                              'out': str(wd / 'pub.json')})
        procs.append(pub)
        if pub.wait(600) != 0:
            raise RuntimeError(f'publisher failed:\n{pub.tail()}')
        time.sleep(1.2)
        recv.stop()
        for m in monitors:
            m.stop()
        for node in nodes:
            node.stop()
        pub_out = json.loads((wd / 'pub.json').read_text())
        rec = json.loads((wd / 'recv.json').read_text())
        stats = [json.loads((wd / f'node{i}.json').read_text()) for i in range(len(nodes))]
    finally:
        for pr in reversed(procs):
            if pr.alive():
                pr.stop()
    stamps = pub_out.get('stamps_by_topic') or {topics[0]: pub_out['stamp']}
    t0 = stamps[topics[0]][0] + warmup
    t1 = stamps[topics[0]][-1]
    lat, per_cam_rate = [], []
    for topic, cls_topic in zip(topics, cls):
        st = np.asarray(stamps[topic])
        got = rec['by_topic'][cls_topic]
        seq = np.asarray(got['seq'], np.int64)
        t = np.asarray(got['t'])
        ok = (seq >= 0) & (seq < len(st))
        seq, t = seq[ok], t[ok]
        m = st[seq] >= t0
        lat.append((t[m] - st[seq][m]) * 1e3)
        per_cam_rate.append(float(m.sum()) / max(1e-9, t1 - t0))
    lat = np.concatenate(lat) if lat else np.zeros(0)
    cpu = sum(m.cpu_percent(t0, t1 + 0.5) for m in monitors)
    rss = sum(m.rss_at(t1) for m in monitors)
    classified = sum(r * (t1 - t0) for r in per_cam_rate)
    batches = [b for s in stats for b in s.get('batches', []) if t0 <= b[0] <= t1]
    singles = sum(1 for s in stats for t, _ in s.get('infers', []) if t0 <= t <= t1)
    calls = singles + len(batches)
    frames_inferred = singles + sum(b[2] for b in batches)
    published = len(stamps[topics[0]]) * n_cams
    received = sum(s.get('received', 0) for s in stats)
    common.cleanup(wd)
    return {'layout': layout, 'cameras': n_cams, 'processes': len(nodes), 'seconds': seconds,
            'cpu_percent': cpu, 'cpu_ms_per_frame': cpu * 10.0 / max(1e-9, sum(per_cam_rate)),
            'rss_mb': rss, 'latency': common.lat_summary(lat),
            'output_rate_hz_per_camera': per_cam_rate, 'output_rate_hz_min': min(per_cam_rate),
            'classified_in_window': int(round(classified)), 'published': published,
            'lost_before_node': published - received,
            'node_dropped': sum(s.get('dropped', 0) for s in stats),
            'node_rejected': sum(s.get('rejected', 0) for s in stats),
            'frames_per_ort_call': frames_inferred / calls if calls else None}


def run(args) -> dict:
    common.stop_on_sigterm()
    t_start = time.monotonic()
    bundle, binfo = common.resolve_bundle(args.bundle)
    seconds, warmup = (3.0, 1.0) if args.quick else (15.0, 3.0)
    plan = ([('one_node', 1), ('one_node', 2), ('per_camera', 2)] if args.quick else
            [('one_node', 1), ('one_node', 2), ('one_node', 4), ('per_camera', 2), ('per_camera', 4)])
    rows = []
    for layout, n in plan:
        print(f'[{NAME}] {layout} x{n} cameras, {seconds:.0f} s at {RATE_HZ:.0f} Hz each', flush=True)
        rows.append(session(layout, n, bundle, seconds, warmup))
    base = next(r for r in rows if r['layout'] == 'one_node' and r['cameras'] == 1)
    derived = {}
    for layout in ('one_node', 'per_camera'):
        for r in rows:
            if r['layout'] == layout and r['cameras'] > 1:
                k = f'{layout}_x{r["cameras"]}'
                extra = r['cameras'] - 1
                derived[k] = {
                    'cpu_percent_per_extra_camera': (r['cpu_percent'] - base['cpu_percent']) / extra,
                    'cpu_ms_per_extra_camera_frame': (r['cpu_percent'] - base['cpu_percent']) * 10.0
                    / (extra * RATE_HZ),
                    'rss_mb_per_extra_camera': (r['rss_mb'] - base['rss_mb']) / extra,
                    'p99_ratio_vs_one_camera': r['latency']['p99_ms'] / base['latency']['p99_ms']
                    if base['latency']['p99_ms'] else None}
    ratios = {}
    for n in (2, 4):
        a, b = derived.get(f'one_node_x{n}'), derived.get(f'per_camera_x{n}')
        one = next((r for r in rows if r['layout'] == 'one_node' and r['cameras'] == n), None)
        sep = next((r for r in rows if r['layout'] == 'per_camera' and r['cameras'] == n), None)
        if a and b and one and sep:
            ratios[f'x{n}'] = {'cpu_one_node_over_per_camera': one['cpu_percent'] / sep['cpu_percent'],
                               'rss_one_node_over_per_camera': one['rss_mb'] / sep['rss_mb']}
    most = max(r['cameras'] for r in rows)  # the headline figures: the most cameras this run had
    one, sep = derived.get(f'one_node_x{most}', {}), derived.get(f'per_camera_x{most}', {})
    data = {'cpu_ms_per_extra_camera_frame': one.get('cpu_ms_per_extra_camera_frame'),
            'cpu_percent_per_extra_camera': one.get('cpu_percent_per_extra_camera'),
            'rss_mb_per_extra_camera': one.get('rss_mb_per_extra_camera'),
            'rss_mb_per_extra_camera_process': sep.get('rss_mb_per_extra_camera'),
            'headline_cameras': most,
            'bundle': binfo, 'rate_hz_per_camera': RATE_HZ, 'resolution': f'{WIDTH}x{HEIGHT}',
            'sessions': rows, 'per_extra_camera': derived, 'ratios': ratios,
            'definitions': {
                'cpu_percent': 'CPU of the node process(es), 100 = one core, over the measured window',
                'cpu_ms_per_frame': 'node CPU ms per classified frame (all cameras)',
                'cpu_ms_per_extra_camera_frame': 'extra node CPU ms per frame of each camera after the first',
                'rss_mb_per_extra_camera': 'extra resident memory of the node process(es) per camera',
                'rss_mb_per_extra_camera_process': 'the same for one node process per camera',
                'headline_cameras': 'the top-level per-extra-camera figures are from the sessions with this '
                                    'many cameras',
                'frames_per_ort_call': 'frames inferred per ONNX Runtime call (batched across cameras)',
                'latency': 'header stamp -> classification receipt, ms, every camera pooled'}}
    table = [{'layout': r['layout'], 'cams': r['cameras'], 'cpu%': round(r['cpu_percent'], 1),
              'cpu ms/frame': round(r['cpu_ms_per_frame'], 2), 'rss MB': round(r['rss_mb']),
              'p50 ms': round(r['latency']['p50_ms'], 1), 'p99 ms': round(r['latency']['p99_ms'], 1),
              'Hz/cam (min)': round(r['output_rate_hz_min'], 1), 'dropped': r['node_dropped'],
              'lost': r['lost_before_node'], 'frames/call': r['frames_per_ort_call'] and
              round(r['frames_per_ort_call'], 2)} for r in rows]
    _plot(rows, args)
    common.report(NAME, data, args, t_start, table, title=f'{WIDTH}x{HEIGHT} at {RATE_HZ:.0f} Hz per camera')
    return data


def _plot(rows, args) -> None:
    fig, axes = common.subplots(1, 2, figsize=(10, 3.8))
    for layout, marker in (('one_node', 'o-'), ('per_camera', 's--')):
        rs = sorted([r for r in rows if r['layout'] == layout or (r['cameras'] == 1)],
                    key=lambda r: r['cameras'])
        n = [r['cameras'] for r in rs]
        label = 'one node, N cameras' if layout == 'one_node' else 'one node per camera'
        axes[0].plot(n, [r['cpu_percent'] for r in rs], marker, label=label)
        axes[1].plot(n, [r['rss_mb'] for r in rs], marker, label=label)
    axes[0].set(xlabel='cameras (30 Hz, 640x480 each)', ylabel='node CPU % (100 = one core)')
    axes[1].set(xlabel='cameras', ylabel='node RSS (MB)')
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    common.savefig(fig, NAME, args)


main = common.entry(NAME, run, __doc__)

if __name__ == '__main__':
    raise SystemExit(main())
