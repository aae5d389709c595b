"""overload: 640x480 frames at 60 and 120 Hz into the student node (newest-frame slot).

Checks that the output never lags the input by more than one frame, that the node's RSS is flat, and
that the node's ``dropped`` counter accounts exactly for the frames it received and did not classify.

Lag (per classification of frame k): the number of frames j > k whose header stamp (publish time) is
earlier than the time the node finished processing frame k (end of ``PerceptionNode._process``, which
publishes the classification; same wall clock). ``max_lag_frames`` is its maximum over the run after
the warm-up; 0 = the newest frame was classified, 1 = one newer frame was already waiting. The same with
the receipt time in the receiver instead (includes the trip back) is ``max_lag_frames_at_receipt``.

    python -m bench.overload [--quick] [--bundle DIR] [--qos best_effort|reliable] [--results-dir D]
"""

from __future__ import annotations

import time

import numpy as np

from bench import common

NAME = 'overload'


def lags(stamps: np.ndarray, seqs: np.ndarray, t_done: np.ndarray) -> np.ndarray:
    """For frame seqs[i] done at t_done[i]: #frames j > seq with stamps[j] < t_done[i]."""
    published_by = np.searchsorted(stamps, t_done, side='left')  # frames 0..n-1 published before t
    return np.maximum(0, published_by - (seqs + 1))


def session(bundle: str, rate: float, duration: float, warmup: float, qos: str, dds: str,
            node_params: dict | None = None) -> dict:
    """One rate; ``node_params``: extra node parameters (the contrast run)."""
    wd = common.new_workdir(f'{NAME}_{int(rate)}')
    params = {**common.perception_params(bundle, wd / 'state', qos), **(node_params or {})}
    res = common.stream_session(wd, common.node_args('student', params), rate, duration + warmup, dds=dds)
    s, j = common.session_summary(res, warmup)
    stamps = j['stamps']
    t0 = j['t_measure_start']
    # node-side: time each frame's processing ended (the classification is published inside)
    fr = res['node'].get('frames', [])
    seq_n = np.asarray([int(f[0]) for f in fr], np.int64)
    done_n = np.asarray([f[2] + f[3] * 1e-3 for f in fr])
    meas_n = stamps[seq_n] >= t0 if len(seq_n) else np.zeros(0, bool)
    lag_node = lags(stamps, seq_n[meas_n], done_n[meas_n])
    # node-side queue lag: newer frames that had *arrived at the node* (subscription callback) by then
    arr = np.asarray(res['node'].get('arrivals', []), np.float64).reshape(-1, 2)
    arr = arr[np.argsort(arr[:, 1])] if len(arr) else arr
    lag_q = (np.asarray([int(np.sum((arr[:, 1] <= d) & (arr[:, 0] > k)))
                         for k, d in zip(seq_n[meas_n], done_n[meas_n])], np.int64)
             if len(arr) else np.zeros(0, int))
    meas_r = j['measured']
    lag_recv = lags(stamps, j['seq'][meas_r], j['t_recv'][meas_r])
    samples = np.asarray(res['monitor'].samples)  # (t, cpu s, rss MB, anon MB, shm MB)
    after = samples[(samples[:, 0] >= t0) & (samples[:, 0] <= stamps[-1] + 0.5)]
    # medians over the first / last 10% (>= 4 samples) after the warm-up: robust to transient spikes
    k = max(4, len(after) // 10)
    (rss_warm, rss_end), (anon_warm, anon_end), (shm_warm, shm_end) = (
        common.first_last(after[:, c], k) for c in (2, 3, 4))
    node = res['node']
    identity = node['received'] - node['processed'] - node['rejected'] - node['dropped']

    def hist(lag):
        return {str(k): int(v) for k, v in zip(*np.unique(lag, return_counts=True))}

    s.update(
        rate_hz=rate, duration_s=duration, warmup_s=warmup,
        max_lag_frames=int(lag_node.max()) if lag_node.size else None, lag_histogram=hist(lag_node),
        max_lag_frames_at_receipt=int(lag_recv.max()) if lag_recv.size else None,
        max_queue_lag_frames=int(lag_q.max()) if lag_q.size else None, queue_lag_histogram=hist(lag_q),
        lag_at_receipt_histogram=hist(lag_recv),
        rss_after_warmup_mb=rss_warm, rss_end_mb=rss_end, rss_growth_mb=rss_end - rss_warm,
        rss_slope_mb_per_min=common.slope_per_min(after[:, 0], after[:, 2]),
        rss_anon_growth_mb=anon_end - anon_warm, rss_shmem_growth_mb=shm_end - shm_warm,
        drops_identity_residual=identity,
        drops_exact=bool(identity == 0 and s['classified'] == node['processed']),
        published_minus_classified_minus_rejected=s['published'] - s['classified'] - node['rejected'],
        _rss=(samples[:, 0] - stamps[0], samples[:, 2]), _lag=lag_node)  # _*: for the plot
    return s


def run(args) -> dict:
    t_start = time.monotonic()
    bundle, binfo = common.resolve_bundle(args.bundle)
    duration, warmup = (4, 1.5) if args.quick else (120, 10)
    runs = []
    for rate in (60.0, 120.0):
        print(f'[{NAME}] 640x480 @ {rate:g} Hz, DDS {args.dds}, for {duration} s (+{warmup} s warm-up) ...',
              flush=True)
        runs.append(session(str(bundle), rate, duration, warmup, args.qos, args.dds))
    extras = [(r.pop('_rss'), r.pop('_lag')) for r in runs]
    valid = [r['max_lag_frames'] for r in runs if r['max_lag_frames'] is not None]
    contrast = None
    if not args.quick:  # same 120 Hz load, the node left at Python's 5 ms GIL switch interval
        print(f'[{NAME}] contrast: 120 Hz, gil_switch_interval_ms:=0 (Python default), 30 s ...', flush=True)
        c = session(str(bundle), 120.0, 30, warmup, args.qos, args.dds, {'gil_switch_interval_ms': 0.0})
        c.pop('_rss'), c.pop('_lag')
        shipped = runs[-1]

        def both(get):
            return {'shipped_0.5ms': get(shipped), 'python_default_5ms': get(c)}

        contrast = {k: both(lambda r, k=k: r.get(k))
                    for k in ('output_rate_hz', 'max_lag_frames', 'max_queue_lag_frames', 'node_dropped')}
        contrast['latency_p99_ms'] = both(lambda r: r['latency']['p99_ms'])
        contrast['node_infer_p99_ms'] = both(lambda r: (r.get('node_infer_ms') or {}).get('p99_ms'))
    data = {
        'max_lag_frames': max(valid) if valid else None,
        'rss_growth_mb': max(r['rss_growth_mb'] for r in runs),
        'drops_exact': all(r['drops_exact'] for r in runs),
        'targets': {'max_lag_frames<=1': bool(valid) and max(valid) <= 1},
        'bundle': binfo, 'student_qos': args.qos, 'dds': args.dds, 'publisher_qos': 'reliable, depth 10',
        'runs': runs,
        'gil_contrast_120hz': contrast,
        'definitions': {
            'gil_contrast_120hz': 'full runs: the 120 Hz run (shipped gil_switch_interval_ms 0.5) beside a '
            '30 s run of the same node with gil_switch_interval_ms:=0 (Python\'s 5 ms), in the same run',
            'lag': 'per classification of frame k: #frames j>k published (header stamp) before the node '
            'finished processing frame k (its classification is published at that point); '
            'max over frames published after the warm-up',
            'lag_at_receipt': 'the same, with the receipt time in the receiver process',
            'queue_lag': 'per classification of frame k: #frames j>k that had arrived at the node (image '
            'subscription callback) before the node finished processing frame k: the part of the lag that is '
            'the node\'s own queueing (newest-frame slot); frames in transit are not counted',
            'dds': 'large_shm (default here) = config/fastdds_large_shm.xml, so the node receives the '
            'offered rate (with the default 512 KiB shared-memory segment most 640x480 frames are lost '
            'before the node, see node_latency); --dds default runs the shipped transports',
            'rss_growth_mb': 'node RSS at the end - RSS right after the warm-up (medians of the last / '
            'first 10% of the 0.5 s samples after the warm-up; max over the rates); '
            'rss_slope_mb_per_min: least squares; rss_anon_growth_mb / rss_shmem_growth_mb: the same for '
            'RssAnon (heap: what a leak grows) and RssShmem (DDS shared-memory pages touched) from /proc',
            'drops_exact': 'node dropped == node received - processed - rejected (no frame unaccounted for '
            'inside the node) and every processed frame was received by the receiver',
            'lost_before_node': 'published - node received: frames the node never saw (DDS/transport), '
            'which the node cannot count',
        },
    }
    rows = [{'rate_hz': r['rate_hz'], 'in_hz': r['input_rate_hz'], 'out_hz': r['output_rate_hz'],
             'max_lag': r['max_lag_frames'], 'max_lag_rx': r['max_lag_frames_at_receipt'],
             'max_q_lag': r['max_queue_lag_frames'], 'p50_ms': r['latency']['p50_ms'],
             'p99_ms': r['latency']['p99_ms'], 'published': r['published'], 'node_rx': r['node_received'],
             'processed': r['node_processed'], 'dropped': r['node_dropped'], 'exact': r['drops_exact'],
             'rss_growth_mb': r['rss_growth_mb'], 'anon_growth_mb': r['rss_anon_growth_mb'],
             'cpu%': r['cpu_percent']} for r in runs]
    plot(runs, extras, args)
    common.report(NAME, data, args, t_start, rows, title=f'bundle {binfo["name"]}')
    return data


def plot(runs: list[dict], extras: list, args) -> None:
    fig, axes = common.subplots(1, 2, figsize=(11, 4))
    for r, ((t, rss), lag) in zip(runs, extras):
        axes[0].plot(t, rss, label=f'{r["rate_hz"]:g} Hz')
        u, c = np.unique(lag, return_counts=True)
        axes[1].bar(u + (0.2 if r['rate_hz'] > 60 else -0.2), c, width=0.4, label=f'{r["rate_hz"]:g} Hz')
    axes[0].set(xlabel='time since first frame (s)', ylabel='node RSS (MB)')
    axes[1].set(yscale='log', xlabel='lag (newer frames already published)', ylabel='classifications')
    for ax in axes:
        ax.legend()
    common.savefig(fig, NAME, args)


def add_args(p) -> None:
    common.add_qos_arg(p)
    common.add_dds_arg(p, 'Fast DDS transports of all processes (default: large_shm, see definitions)')


main = common.entry(NAME, run, __doc__, add_args)


if __name__ == '__main__':
    raise SystemExit(main())
