"""swap: 100 head swaps (HeadRegistry.add + ~/reload_head, alternating two heads) while 640x480 frames
stream at 30 Hz on a reliable QoS.

Same run, two phases: ``no_swap_s`` of plain streaming, then the swaps every ``period_s``. Reports frames
published vs classified (0 dropped expected), the time of every ``Engine.swap_head`` call inside the node
(validation + the one reference assignment the inference thread sees), the inference time of frames
processed near a swap vs the no-swap phase, and the largest gap between consecutive classifications in
each phase.

    python -m bench.swap [--quick] [--bundle DIR] [--results-dir D]
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from bench import common

NAME = 'swap'
NEAR_S = 0.1  # a frame is "near a swap" if its processing started within 100 ms of a swap_head call


def session(bundle: str, n_swaps: int, period: float, no_swap: float, warmup: float, rate: float) -> dict:
    """The student node on reliable QoS, 640x480 frames at ``rate`` Hz, and the swap schedule in the
    receiver: ``n_swaps`` every ``period`` s after ``warmup + no_swap`` s."""
    wd = common.new_workdir(NAME)
    state = wd / 'state'
    params = {**common.perception_params(bundle, state, 'reliable'), 'qos_depth': 10}
    swap = {'bundle': bundle, 'state_dir': str(state), 'n': n_swaps, 'period_s': period,
            'no_swap_s': warmup + no_swap}
    return common.stream_session(wd, common.node_args('student', params), rate,
                                 warmup + no_swap + n_swaps * period + 3.0,
                                 recv_cfg=dict(common.PERCEPTION_RECV, swap=swap), settle_s=1.5)


def run(args) -> dict:
    t_start = time.monotonic()
    bundle, binfo = common.resolve_bundle(args.bundle)
    n_swaps, period, no_swap = (10, 0.2, 3.0) if args.quick else (100, 0.2, 20.0)
    warmup, rate = 2.0, 30.0
    print(f'[{NAME}] {n_swaps} swaps every {period} s after {no_swap} s without, 640x480 @ {rate:g} Hz '
          f'(reliable) ...', flush=True)
    res = session(str(bundle), n_swaps, period, no_swap, warmup, rate)
    data, (tr, gaps, node_swaps) = analyse(res, warmup)
    data.update({
        'bundle': binfo, 'rate_hz': rate, 'qos': 'reliable (node depth 10, publisher depth 10)',
        'definitions': {
            'dropped_frames': 'frames published - classifications received (whole run incl. warm-up); '
            'dropped_frames_by_phase: when those frames were published (before/during/after the swaps)',
            'max_pause_ms': 'longest Engine.swap_head call in the node (validation + the reference '
            'assignment); the inference thread holds no lock, so this bounds the time a '
            'swap can stall it (GIL)',
            'gap_ms_*': 'time between consecutive classification receipts, swap phase vs the no-swap phase '
            'before it (nominal 33.3 ms at 30 Hz)',
            'process_ms_near_swaps': 'PerceptionNode._process time of frames taken within '
            f'{NEAR_S * 1e3:.0f} ms of a swap_head call, vs frames in the no-swap phase',
        },
    })
    rows = [{'swaps_ok': f'{data["swaps_ok"]}/{data["swaps_requested"]}', 'published': data['published'],
             'classified': data['classified'], 'dropped': data['dropped_frames'],
             'swap_head_max_ms': data['max_pause_ms'], 'swap_head_p50_ms': data['swap_head_ms']['p50_ms'],
             'gap_max_no_swap': data['gap_ms_no_swaps']['max_ms'],
             'gap_max_swaps': data['gap_ms_during_swaps']['max_ms'],
             'proc_p99_no': data['process_ms_no_swaps']['p99_ms'],
             'proc_p99_near': data['process_ms_near_swaps']['p99_ms']}]
    plot(tr, gaps, node_swaps, args)
    common.report(NAME, data, args, t_start, rows, title=f'bundle {binfo["name"]}')
    return data


def analyse(res: dict, warmup: float) -> tuple[dict, tuple]:
    """The run's figures, and (receipt times, gaps, the node's swap_head records) for the plot."""
    s, j = common.session_summary(res, warmup)
    recv, node = res['recv'], res['node']
    swaps = recv['swaps']
    node_swaps = np.asarray(node.get('swaps', []), np.float64).reshape(-1, 2)  # (wall t, ms)
    t_sw0, t_sw1 = recv['swap_start'], recv['swap_end']
    stamps, t0 = j['stamps'], j['t_measure_start']
    # gaps between consecutive classifications (receiver) in each phase
    tr = np.sort(j['t_recv'][j['measured']])
    gaps = np.diff(tr) * 1e3
    mid = tr[1:]
    in_sw = (mid >= t_sw0) & (mid <= t_sw1 + 0.1) if t_sw0 else np.zeros_like(mid, bool)
    gap_sw, gap_no = gaps[in_sw], gaps[~in_sw & (mid < (t_sw0 or np.inf))]
    # inference-thread time per frame near swaps vs in the no-swap phase (node side)
    fr = [f for f in node.get('frames', []) if f[1] >= t0]
    ft = np.asarray([f[2] for f in fr])
    fd = np.asarray([f[3] for f in fr])
    if len(node_swaps) and len(ft):
        near = np.min(np.abs(ft[:, None] - node_swaps[None, :, 0]), axis=1) <= NEAR_S
    else:
        near = np.zeros(len(ft), bool)
    before = ft < (t_sw0 or np.inf)
    ok = sum(1 for x in swaps if x['success'])
    published = len(stamps)
    dropped_frames = published - s['classified']
    missing = sorted(set(range(published)) - set(int(q) for q in j['seq']))
    t_sw_end = (t_sw1 or 0) + 0.1

    def phase(q):
        t = stamps[q]
        return ('during_swaps' if t_sw0 and t_sw0 <= t <= t_sw_end
                else ('before_swaps' if not t_sw0 or t < t_sw0 else 'after_swaps'))

    missing_by_phase = dict(Counter(phase(q) for q in missing))
    swap_ms = node_swaps[:, 1] if len(node_swaps) else np.zeros(0)
    return {
        'dropped_frames': dropped_frames, 'dropped_frames_by_phase': missing_by_phase,
        'dropped_seqs': missing[:50], 'max_pause_ms': float(swap_ms.max()) if swap_ms.size else None,
        'swaps_requested': len(swaps), 'swaps_ok': ok, 'swap_head_calls': int(len(swap_ms)),
        'swap_head_ms': common.lat_summary(swap_ms),
        'reload_service_roundtrip_ms': common.lat_summary([(x['t_done'] - x['t_call']) * 1e3 for x in swaps]),
        'registry_add_ms': common.lat_summary([(x['t_call'] - x['t_add']) * 1e3 for x in swaps]),
        'published': published, 'classified': s['classified'], 'node_dropped': node.get('dropped'),
        'node_rejected': node.get('rejected'), 'lost_before_node': s['lost_before_node'],
        'gap_ms_no_swaps': common.lat_summary(gap_no), 'gap_ms_during_swaps': common.lat_summary(gap_sw),
        'process_ms_no_swaps': common.lat_summary(fd[before & ~near]),
        'process_ms_near_swaps': common.lat_summary(fd[near]),
        'latency': s['latency'], 'head_version_end': node.get('head_version'),
        'failed_swaps': [x['message'] for x in swaps if not x['success']][:5],
    }, (tr, gaps, node_swaps)


def plot(tr, gaps, node_swaps, args) -> None:
    fig, ax = common.subplots(figsize=(10, 3.5))
    ax.plot(tr[1:] - tr[0], gaps, '.', ms=3, label='gap between classifications')
    for t, _ in node_swaps:
        ax.axvline(t - tr[0], color='r', alpha=0.15, lw=0.8)
    ax.set(xlabel='time (s); red lines = swap_head calls', ylabel='gap (ms)')
    ax.legend()
    common.savefig(fig, NAME, args)


main = common.entry(NAME, run, __doc__)


if __name__ == '__main__':
    raise SystemExit(main())
