"""adaptation_memory: RSS of the adaptation node under 10 Hz camera streams of growing frame size.

    python -m bench.adaptation_memory [--quick] [--stream-s 20] [--post-s 15] [--encoding bgr8|rgb8]
                                      [--only-case NAME ...] [--bundle DIR] [--results-dir D]

The adaptation node used to hold ~80 full ``sensor_msgs/Image`` messages (64 recent frames for late labels
+ a 16-message queue): RSS grew with the frame size and stayed up after the camera stopped. It now keeps
small crops of recent frames (:mod:`edge_tl_ros.recent`), bounds the camera data it holds by
``memory_max_bytes`` (3/4 incoming queue, 1/4 remembered crops) and forgets frames after
``label_pending_s``. This measures it, all cases in one run, one after the other:

* the node as its own process (``python -m edge_tl_ros.nodes.adaptation_node``, as ``ros2 run`` starts
  it), a fresh one per case: the student bundle, ``teacher_bundle:=''`` (no teacher),
  ``round.every_n_labels:=0`` (no rounds), ``store.sample_rate_hz`` at its default, a fresh temporary
  ``state_dir``, ``advanced.diagnostics_period_s:=0.5``;
* this process publishes ``image`` (``bgr8`` by default; reliable, depth 2: a reliable writer also serves
  the node's best-effort reader) at 10 Hz for ``--stream-s`` s, and a label on ``labels`` for every 10th
  frame (its stamp + a class of the bundle) 50 ms after the frame; then the camera stops and the node is
  watched ``--post-s`` s more;
* cases: 640x480, 1920x1080, 3840x2160 at the default budget (64 MiB) and ``label_pending_s`` (10 s), each
  followed by its *transport floor* (``<size> floor``: a bare rclpy process subscribing the same frames
  with the same QoS and executor, dropping each at once: what any subscriber of them costs); then
  1920x1080 with ``advanced.memory_max_bytes:=8388608`` and ``advanced.label_pending_s:=2`` (the
  bound, and the release after 2 s).
  ``--quick``: 8 s streams, no 4K, floor at 1080p only, 4 s after the stop, ``advanced.label_pending_s:=2``;
* Fast DDS with ``config/fastdds_large_shm.xml`` (``FASTDDS_DEFAULT_PROFILES_FILE``) in both processes,
  localhost discovery, a ROS domain of this run's own (``common.ros_env``).

The node's RSS, RssAnon and RssShmem are sampled every 0.5 s (``common.ProcMonitor``) and its
``~/status`` (``memory``: queued_frames/bytes, recent_frames/bytes, max_bytes; counters) recorded.
Per case: RSS after start (median of the samples before the first frame), peak and median while
streaming, RSS 12+ s after the stop (median of the samples from stop + 12 s to the end; quick: the last
2 s), growth = each minus the start, the max of ``queued_bytes + recent_bytes`` over the status messages,
frames published / received / handled / stored, labels applied; ``rss_growth_net_*`` = the node's growth
minus its size's floor's. Ratios: ``rss_growth_ratio`` = peak RSS growth at the largest frame / at
640x480 (~1 when memory does not scale with the frame; the frame bytes ratio is 27 at 4K; ``_net``: of
the net growths), ``growth_vs_old_design`` = peak growth / (80 x frame bytes, what the old design held).
``bound_held``: the camera bytes the node reported never exceeded its ``memory_max_bytes`` (the newest
message is always kept, so a single frame larger than the queue's 3/4 share is allowed over it).
No thresholds on wall-clock; a node that fails to start is reported as that case's ``error``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import numpy as np

from bench import common

NAME = 'adaptation_memory'
OLD_HELD = 80  # full messages the old design held: 64 recent frames + a 16-message queue
RATE_HZ = 10.0
LABEL_EVERY = 10
LABEL_DELAY_S = 0.05
SAMPLE_S = 0.5
BASELINE_S = 3.0
AFTER_STOP_FROM_S = 12.0
DEFAULT_BUDGET = 64 << 20
SMALL_BUDGET = 8 << 20


def cases(quick: bool) -> list[dict]:
    """The node at each frame size, each followed by the transport floor at that size; the small budget."""
    pend = 2.0 if quick else None
    sizes = [(640, 480), (1920, 1080)] + ([] if quick else [(3840, 2160)])
    c = []
    for w, h in sizes:
        c.append({'case': f'{w}x{h}', 'w': w, 'h': h, 'label_pending_s': pend})
        if not quick or w == 1920:
            c.append({'case': f'{w}x{h} floor', 'w': w, 'h': h, 'kind': 'floor'})
    c.append({'case': '1920x1080, 8 MiB budget', 'w': 1920, 'h': 1080, 'label_pending_s': 2.0,
              'memory_max_bytes': SMALL_BUDGET})
    return c


def floor_subscriber() -> int:
    """The transport floor: a bare rclpy node named like the adaptation node, subscribing ``image`` with
    the same QoS (sensor data) on the same executor (single-threaded), dropping every message at once;
    its ``~/status`` only counts. What any subscriber of these frames costs in this process."""
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from vision_msgs.msg import Classification

    from edge_tl_ros.nodes.params import run_node

    def make_node():
        node = rclpy.create_node('adaptation')
        n = {'frames_received': 0, 'labels_received': 0}

        def on_frame(msg):
            n['frames_received'] += 1

        def on_label(msg):
            n['labels_received'] += 1

        node.create_subscription(Image, 'image', on_frame, qos_profile_sensor_data)
        node.create_subscription(Classification, 'labels', on_label,
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        pub = node.create_publisher(String, '~/status', QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))

        def tick():
            pub.publish(String(data=json.dumps({'pid': os.getpid(), 'counters': dict(n), 'memory': None})))

        tick()
        node.create_timer(0.5, tick)
        return node

    return run_node(make_node, 'adaptation', num_threads=1)  # the nodes' main(): SingleThreadedExecutor


class TimeUp(BaseException):
    """The whole run's time limit (SIGALRM): not caught per case, so everything stops."""


# -- the camera ----------------------------------------------------------------------------------------
class Camera(common.Driver):
    """Camera + labeller + status observer: one rclpy node in this process, spun in a thread."""

    def __init__(self, domain: int):
        super().__init__('adaptation_memory_camera', domain, image_depth=2)
        self.start()

    def wait_node(self, proc, timeout: float) -> None:
        """Until the node's first ~/status is seen and it subscribes image and labels."""
        self.wait_ready(lambda: bool(self.status_of(proc.pid)) and self.pub.get_subscription_count() >= 1
                        and self.pub_lab.get_subscription_count() >= 1, [proc], timeout)

    def stream(self, msgs: list, names: list[str], duration: float, proc) -> dict:
        """Frames at RATE_HZ on an absolute schedule (no catch-up bursts), a label after every 10th."""
        n = int(round(duration * RATE_HZ))
        t0 = time.perf_counter()
        late, labels, pub_ms = 0, 0, []
        for seq in range(n):
            t_frame = t0 + seq / RATE_HZ
            now = time.perf_counter()
            if t_frame > now:
                time.sleep(t_frame - now)
            elif now - t_frame > 1.0 / RATE_HZ:
                late += 1
            msg = msgs[seq % len(msgs)]
            common.stamp(msg.header, seq)
            a = time.perf_counter()
            self.pub.publish(msg)
            pub_ms.append((time.perf_counter() - a) * 1e3)
            if seq % LABEL_EVERY == 0:
                now = time.perf_counter()
                if t_frame + LABEL_DELAY_S > now:
                    time.sleep(t_frame + LABEL_DELAY_S - now)
                self.pub_lab.publish(self.label(names[(seq // LABEL_EVERY) % len(names)], msg.header))
                labels += 1
            if seq % 20 == 0:
                proc.check('died while streaming', 15)
        wall = time.perf_counter() - t0
        return {'published': n, 'labels_published': labels, 'late_frames': late,
                'achieved_rate_hz': n / max(1e-9, wall), 'publish_ms_p50': common.pct(pub_ms, 50),
                'publish_ms_max': float(max(pub_ms)) if pub_ms else None}


# -- one case ------------------------------------------------------------------------------------------
def _window(samples, t0, t1, col):
    return np.asarray([s[col] for s in samples if t0 <= s[0] <= t1], np.float64)


def _med(x):
    return float(np.median(x)) if len(x) else None


def _max(x):
    return float(np.max(x)) if len(x) else None


def _minus(a, b):
    return None if a is None or b is None else a - b


def node_params(spec: dict, bundle, state_dir) -> dict:
    """The adaptation node's parameters in a case (the one place this benchmark names them)."""
    params = {'model_bundle': bundle, 'state_dir': state_dir, 'teacher_bundle': "''",
              'round.every_n_labels': 0, 'advanced.diagnostics_period_s': 0.5}
    if 'memory_max_bytes' in spec:
        params['advanced.memory_max_bytes'] = spec['memory_max_bytes']
    if spec.get('label_pending_s') is not None:
        params['advanced.label_pending_s'] = spec['label_pending_s']
    return params


def rss_figures(out: dict, s: list, t_ready: float, t_stream: float, t_stop: float, t_end: float,
                post_s: float) -> None:
    """RSS / RssAnon / RssShmem at start, peak, streaming median, after the stop, and the growths."""
    after_from = t_stop + (AFTER_STOP_FROM_S if post_s >= AFTER_STOP_FROM_S + 1 else max(0.0, post_s - 2.0))
    for col, key in ((2, 'rss'), (3, 'rss_anon'), (4, 'rss_shmem')):
        start = _med(_window(s, t_ready, t_stream, col))
        peak = _max(_window(s, t_stream, t_stop + 0.5, col))
        med = _med(_window(s, t_stream, t_stop, col))
        after = _med(_window(s, after_from, t_end + 1, col))
        out.update({f'{key}_start_mb': start, f'{key}_peak_mb': peak, f'{key}_median_streaming_mb': med,
                    f'{key}_after_stop_mb': after, f'{key}_growth_peak_mb': _minus(peak, start),
                    f'{key}_growth_median_mb': _minus(med, start),
                    f'{key}_growth_after_stop_mb': _minus(after, start)})
    out['after_stop_window_s'] = [after_from - t_stop, t_end - t_stop]
    cpu = _window(s, t_stream, t_stop, 1)
    out['cpu_percent_streaming'] = (100.0 * (cpu[-1] - cpu[0]) / max(1e-9, t_stop - t_stream)
                                    if len(cpu) > 1 else None)
    out['old_design_mb'] = OLD_HELD * out['frame_bytes'] / 2**20
    g = out['rss_growth_peak_mb']
    out['growth_vs_old_design'] = None if g is None else g / out['old_design_mb']


def status_figures(out: dict, st: list, t_stream: float, t_stop: float, budget: int) -> list:
    """The node's camera bytes and counters from its ~/status messages; returns (t, camera bytes)."""
    mem = [(t, d.get('memory') or {}) for t, d in st]
    cam_b = [(t, m.get('queued_bytes', 0) + m.get('recent_bytes', 0)) for t, m in mem]
    stream_mem = [m for t, m in mem if t >= t_stream]
    out['status_messages'] = len(st)
    out['max_camera_bytes'] = max((b for t, b in cam_b if t >= t_stream), default=None)
    for k in ('queued_bytes', 'recent_bytes', 'queued_frames', 'recent_frames'):
        out[f'max_{k}'] = max((m.get(k, 0) for m in stream_mem), default=None)
    out['status_max_bytes'] = (mem[-1][1].get('max_bytes') if mem else None)
    out['bound_held'] = (out['max_camera_bytes'] is not None
                         and out['max_camera_bytes'] <= max(budget, out['frame_bytes'] + budget // 4))
    out['within_budget'] = out['max_camera_bytes'] is not None and out['max_camera_bytes'] <= budget
    # release: first status after the stop with nothing held
    rel = [t for t, b in cam_b if t > t_stop and b == 0]
    out['released_after_stop_s'] = (rel[0] - t_stop) if rel else None
    last = st[-1][1] if st else {}
    out['memory_end'] = last.get('memory')
    c = last.get('counters') or {}
    for k in ('frames_received', 'frames_handled', 'frames_stored', 'frames_evaluated', 'labels_received',
              'labels_handled', 'labels_applied', 'labels_expired', 'labels_not_applied', 'frames_bad',
              'worker_errors'):
        out[k] = int(c.get(k, 0))
    out['frames_dropped'] = last.get('frames_dropped')
    out['store_entries'] = (last.get('store') or {}).get('entries')
    return cam_b


def run_case(cam: Camera, spec: dict, args, env, bundle, names, wd, stream_s, post_s) -> dict:
    w, h = spec['w'], spec['h']
    frame_bytes = w * h * 3
    budget = spec.get('memory_max_bytes', DEFAULT_BUDGET)
    cd = wd / spec['case'].replace(' ', '_').replace(',', '')
    cd.mkdir(parents=True, exist_ok=True)
    params = node_params(spec, bundle, cd / 'state')
    floor = spec.get('kind') == 'floor'
    out = {'case': spec['case'], 'kind': spec.get('kind', 'node'), 'width': w, 'height': h,
           'encoding': args.encoding, 'frame_bytes': frame_bytes, 'old_design_bytes': OLD_HELD * frame_bytes}
    if not floor:
        out.update({'memory_max_bytes': budget, 'label_pending_s': spec.get('label_pending_s') or 10.0,
                    'node_params': common.ros_params(params)[1::2]})
    msgs = cam.image_messages(common.frames_for(w, h, n=2), args.encoding)
    print(f'[{NAME}] {spec["case"]}: {"floor subscriber" if floor else "node"} starting ...', flush=True)
    argv = (['-m', f'bench.{NAME}', '--floor-subscriber'] if floor
            else ['-m', 'edge_tl_ros.nodes.adaptation_node', '--ros-args', *common.ros_params(params)])
    proc = common.Proc(argv, env, cd / 'node.log', 'adaptation', die_with_parent=True)
    mon = None
    try:
        t_launch = time.time()
        mon = common.ProcMonitor(proc.pid, SAMPLE_S)
        cam.wait_node(proc, args.start_timeout)
        t_ready = time.time()
        out['start_s'] = t_ready - t_launch
        time.sleep(BASELINE_S)
        t_stream = time.time()
        out.update(cam.stream(msgs, names, stream_s, proc))
        t_stop = time.time()
        common.wait_until(lambda: False, post_s, [proc], poll_s=0.2, what='died after the stream')
        t_end = time.time()
    except Exception as e:  # this case failed (the node did not start, died, ...): report it, go on
        out['error'] = f'{type(e).__name__}: {e}'
        print(f'[{NAME}] {spec["case"]}: {out["error"]}', flush=True)
        out['log_tail'] = proc.tail(20)
        return out
    finally:  # also on Ctrl-C, SIGTERM and the time limit
        del msgs
        if mon is not None:
            mon.stop()
        out['node_rc'] = proc.stop()
    s = mon.samples  # (wall t, cpu s, rss MB, anon MB, shm MB)
    rss_figures(out, s, t_ready, t_stream, t_stop, t_end, post_s)
    st = cam.status_of(proc.pid)
    if floor:  # counts only: it keeps nothing
        c = (st[-1][1].get('counters') or {}) if st else {}
        out.update({k: int(c.get(k, 0)) for k in ('frames_received', 'labels_received')})
        cam_b = []
    else:
        cam_b = status_figures(out, st, t_stream, t_stop, budget)
    out['trace'] = {
        't0': t_stream, 'stream_s': t_stop - t_stream,
        'rss': [[round(x[0] - t_stream, 2), round(x[2], 2), round(x[3], 2)] for x in s if x[0] >= t_ready],
        'camera_bytes': [[round(t - t_stream, 2), int(b)] for t, b in cam_b],
    }
    return out


def aggregate(results: list[dict]) -> dict:
    """The run's figures from its cases (adds the floor and net growths to the node cases)."""
    ok = [r for r in results if 'error' not in r]
    nodes = [r for r in ok if r['kind'] == 'node']
    floors = {(r['width'], r['height']): r for r in ok if r['kind'] == 'floor'}
    for r in nodes:  # the node's growth beyond what a bare subscriber of the same frames grows
        f = floors.get((r['width'], r['height']))
        for k in ('rss_growth_peak_mb', 'rss_growth_median_mb', 'rss_growth_after_stop_mb',
                  'rss_anon_growth_peak_mb'):
            r[f'floor_{k}'] = f[k] if f else None
            r[k.replace('growth', 'growth_net')] = _minus(r[k], f[k]) if f else None
    by = {r['case']: r for r in nodes}
    base = by.get('640x480')
    plain = [r for r in nodes if r['memory_max_bytes'] == DEFAULT_BUDGET]
    largest = max(plain, key=lambda r: r['frame_bytes']) if plain else None

    def ratio(key, big):
        if base is None or big is None or base.get(key) is None or big.get(key) is None:
            return None
        return big[key] / max(base[key], 1.0)  # growth under 1 MB counts as 1 MB (noise floor)

    k4 = by.get('3840x2160')
    return {
        'rss_growth_ratio': ratio('rss_growth_peak_mb', largest),
        'rss_growth_ratio_cases': [largest['case'], '640x480'] if largest and base else None,
        'rss_growth_net_ratio': ratio('rss_growth_net_peak_mb', largest),
        'rss_growth_ratio_4k_vs_640': ratio('rss_growth_peak_mb', k4),
        'rss_growth_net_ratio_4k_vs_640': ratio('rss_growth_net_peak_mb', k4),
        'rss_growth_net_after_stop_ratio_4k_vs_640': ratio('rss_growth_net_after_stop_mb', k4),
        'rss_growth_after_stop_ratio_4k_vs_640': ratio('rss_growth_after_stop_mb', k4),
        'rss_growth_median_ratio_4k_vs_640': ratio('rss_growth_median_mb', k4),
        'rss_anon_growth_ratio_4k_vs_640': ratio('rss_anon_growth_peak_mb', k4),
        'frame_bytes_ratio_4k_vs_640': (3840 * 2160) / (640 * 480),
        'growth_vs_old_design': largest['growth_vs_old_design'] if largest else None,
        'bound_held': bool(nodes) and all(r['bound_held'] for r in nodes)
        and not any(r['kind'] == 'node' for r in results if 'error' in r),
        'failed_cases': [r['case'] for r in results if 'error' in r],
    }


# -- the benchmark -------------------------------------------------------------------------------------
def run(args) -> dict:
    t_start = time.monotonic()
    stream_s = args.stream_s or (8.0 if args.quick else 20.0)
    post_s = args.post_s or (4.0 if args.quick else 15.0)
    bundle, binfo = common.resolve_bundle(args.bundle)
    from edge_tl_ros.bundle import load_bundle

    names = list(load_bundle(bundle).class_names)
    env = common.ros_env(dds='large_shm')
    common.adopt_ros_env(env)
    wd = common.new_workdir(NAME)
    specs = [c for c in cases(args.quick) if not args.only_case or c['case'] in args.only_case]
    print(f'[{NAME}] {binfo["name"]}: {len(specs)} cases, {args.encoding} at {RATE_HZ:g} Hz for '
          f'{stream_s:g} s each, then {post_s:g} s without frames; label every {LABEL_EVERY}th frame',
          flush=True)
    cam = Camera(int(env['ROS_DOMAIN_ID']))
    try:
        results = [run_case(cam, spec, args, env, bundle, names, wd, stream_s, post_s) for spec in specs]
    finally:
        cam.close()
    data = aggregate(results)
    data.update({
        'cases': results,
        'stream_s': stream_s, 'post_s': post_s, 'rate_hz': RATE_HZ, 'label_every': LABEL_EVERY,
        'label_delay_s': LABEL_DELAY_S, 'encoding': args.encoding, 'sample_period_s': SAMPLE_S,
        'dds': 'large_shm (config/fastdds_large_shm.xml)', 'bundle': binfo,
        'definitions': {
            'rss_start_mb': f'median node RSS over the {BASELINE_S:g} s between ready (its first ~/status '
                            'seen, image and labels matched) and the first frame',
            'rss_peak_mb / rss_median_streaming_mb': 'max / median of the 0.5-s samples while streaming',
            'rss_after_stop_mb': f'median of the samples from {AFTER_STOP_FROM_S:g} s after the last frame '
                                 'to the end of the case (quick: the last 2 s)',
            'rss_growth_*_mb': 'that value minus rss_start_mb; rss_anon_* / rss_shmem_*: the same for '
                               'RssAnon (heap, stacks) and RssShmem (DDS shared-memory pages)',
            'max_camera_bytes': 'max over the ~/status messages (every 0.5 s) while streaming and after of '
                                'memory.queued_bytes + memory.recent_bytes',
            'bound_held': 'every case ran and max_camera_bytes <= memory_max_bytes (or one frame + the '
                          'crops\' 1/4 share when a single frame exceeds the queue\'s 3/4 share: the newest '
                          'message is always kept); within_budget: <= memory_max_bytes itself',
            'rss_growth_ratio': 'rss_growth_peak_mb at the largest frame size run at the default budget / at '
                                '640x480 (a growth under 1 MB counts as 1 MB)',
            'growth_vs_old_design': f'rss_growth_peak_mb / ({OLD_HELD} x frame bytes): the full messages the '
                                    'old design held (64 recent + 16 queued)',
            'released_after_stop_s': 'time from the last frame to the first ~/status with no camera data '
                                     'held (queued + recent = 0)',
            'frames_*, labels_*': "the node's ~/status counters at the end of the case",
            'floor': 'a bare rclpy process (python -m bench.adaptation_memory --floor-subscriber) named '
                     'adaptation, subscribing image with qos_profile_sensor_data on a SingleThreadedExecutor '
                     'and dropping each message: the RSS growth any subscriber of these frames has here '
                     '(rclpy message conversion, Fast DDS reader, glibc malloc)',
            'rss_growth_net_*': "the node case's growth minus the floor's at the same frame size",
            'rss_growth_net_ratio': 'rss_growth_ratio of the net growths',
            'rss_*_ratio_4k_vs_640': 'that growth at 3840x2160 / at 640x480 (a growth under 1 MB counts as '
                                     '1 MB); frame_bytes_ratio_4k_vs_640 = 27',
        },
    })
    _plot(args, results)
    common.report(NAME, data, args, t_start, [table_row(r) for r in results],
                  title=f'RSS MB; {binfo["name"]}; growth ratio {_fmt(data["rss_growth_ratio"])} '
                  f'({" / ".join(data["rss_growth_ratio_cases"] or [])}), bound held {data["bound_held"]}')
    if not data['failed_cases']:
        common.cleanup(wd)  # unless BENCH_KEEP=1
    return data


def table_row(r: dict) -> dict:
    """A case's row of the printed table (MB)."""
    if 'error' in r:
        return {'case': r['case'], 'start': 'ERROR', 'peak': r['error'].splitlines()[0][:60]}
    node = r['kind'] == 'node'
    counts = [r['published'], r['frames_received']]
    counts += [r['frames_handled'], r['frames_stored']] if node else []
    return {'case': r['case'], 'start': r['rss_start_mb'], 'peak': r['rss_peak_mb'],
            'median': r['rss_median_streaming_mb'], 'after_stop': r['rss_after_stop_mb'],
            'growth_peak': r['rss_growth_peak_mb'], 'anon_growth': r['rss_anon_growth_peak_mb'],
            'net_growth': r.get('rss_growth_net_peak_mb') if node else None,
            'cam_MB_max': (r['max_camera_bytes'] or 0) / 2**20 if node else None,
            'budget_MB': r['memory_max_bytes'] / 2**20 if node else None,
            'old_MB': r['old_design_mb'], 'vs_old': r['growth_vs_old_design'],
            'pub/recv/hand/stored': '/'.join(map(str, counts)),
            'labels': f'{r["labels_applied"]}/{r["labels_published"]}' if node else None,
            'released_s': r['released_after_stop_s'] if node else None}


def _fmt(v):
    return '-' if v is None else f'{v:.3g}'


def _plot(args, results) -> None:
    plt = common.plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.0))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    ok = [r for r in results if 'error' not in r]
    col, i = {}, 0  # a colour per node case; a floor takes its size's plain node case's colour
    for r in ok:
        if r['kind'] == 'node':
            col[r['case']] = colours[i % len(colours)]
            i += 1
    stream_s = None
    for r in ok:
        c = col.get(r['case']) or col.get(f'{r["width"]}x{r["height"]}', '0.5')
        tr = np.asarray(r['trace']['rss'], np.float64).reshape(-1, 3)
        stream_s = r['trace']['stream_s']
        floor = r['kind'] == 'floor'
        axes[0].plot(tr[:, 0], tr[:, 1] - r['rss_start_mb'], ':' if floor else '-', color=c,
                     lw=1.2 if floor else 1.8, label=r['case'] + (' (bare subscriber)' if floor else ''))
        if floor:
            continue
        cb = np.asarray(r['trace']['camera_bytes'], np.float64).reshape(-1, 2)
        if len(cb):
            axes[1].step(cb[:, 0], cb[:, 1] / 2**20, where='post', color=c, label=r['case'])
        axes[1].axhline(r['memory_max_bytes'] / 2**20, color=c, ls='--', lw=0.8)
    if stream_s:
        for ax in axes[:2]:
            ax.axvspan(0, stream_s, color='0.92', zorder=0)
    axes[0].set(title='RSS growth over the process start\n(grey: camera at 10 Hz; dotted: transport floor)',
                xlabel='time since first frame (s)', ylabel='MB')
    axes[1].set(title='~/status memory: queued + recent bytes\n(dashed: memory_max_bytes)',
                xlabel='time since first frame (s)', ylabel='MiB')
    axes[1].set_yscale('symlog', linthresh=1.0)
    axes[1].set_ylim(0, max([r.get('memory_max_bytes', 0) / 2**20 for r in ok] + [1]) * 2)
    if ok:
        for ax in axes[:2]:
            ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2)
    nodes = [r for r in ok if r['kind'] == 'node']
    x = np.arange(len(nodes))
    bars = [('rss_growth_peak_mb', 'node: peak RSS growth', None),
            ('floor_rss_growth_peak_mb', 'bare subscriber, same frames: peak growth', '0.75'),
            ('old_design_mb', f'{OLD_HELD} x frame bytes (the old design)', '0.45')]
    for j, (key, label, colour) in enumerate(bars):
        v = [r.get(key) for r in nodes]
        xs = x + (j - 1) * 0.27
        axes[2].bar(xs, [max(0.1, u or 0) for u in v], 0.27, label=label, color=colour)
        for xi, u in zip(xs, v):
            if u is not None:
                axes[2].text(xi, max(0.1, u) * 1.15, f'{u:.0f}', ha='center', fontsize=7)
    axes[2].set_xticks(x, [r['case'].replace(', ', '\n') for r in nodes], fontsize=8)
    axes[2].set(yscale='log', ylabel='MB (log)', title='peak RSS growth while streaming',
                ylim=(1, max([r['old_design_mb'] for r in nodes] + [1]) * 8))
    axes[2].legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=1)
    common.savefig(fig, NAME, args)


def add_args(p) -> None:
    p.add_argument('--stream-s', type=float, default=None,
                   help='seconds of camera per case (default 20; 8 with --quick)')
    p.add_argument('--post-s', type=float, default=None,
                   help='seconds watched after the camera stops (default 15; 4 quick)')
    p.add_argument('--encoding', choices=('bgr8', 'rgb8'), default='bgr8')
    p.add_argument('--start-timeout', type=float, default=60.0, help='seconds a node may take to start')
    p.add_argument('--only-case', nargs='+', default=None,
                   help='run only these cases (names as in the table, e.g. "3840x2160 floor")')
    p.add_argument('--floor-subscriber', action='store_true', help=argparse.SUPPRESS)  # a case's process


def main(argv=None) -> int:
    args = common.bench_parser(__doc__, add_args).parse_args(argv)
    if args.floor_subscriber:
        return floor_subscriber()

    def _alarm(*_):
        raise TimeUp(f'{NAME} ran past its time limit')

    common.stop_on_sigterm()  # run()'s finally stops the node
    signal.signal(signal.SIGALRM, _alarm)
    n = len(cases(args.quick))
    per_case = (args.stream_s or 20.0) + (args.post_s or 15.0) + args.start_timeout + BASELINE_S + 15
    signal.alarm(int(n * per_case + 60))  # bounded whatever happens
    d = run(args)
    signal.alarm(0)
    return 0 if d.get('bound_held') and not d.get('failed_cases') else 1


if __name__ == '__main__':
    raise SystemExit(main())
