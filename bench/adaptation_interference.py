"""adaptation_interference: perception latency while an adaptation round runs vs idle, same run.

Perception: the student ``Engine`` (feature_extractor, 1 ORT thread, as the node runs it) on 640x480 BGR
frames at 30 Hz in this process; the time of each ``Engine.infer`` call is the perception latency.
Rounds: ``edge_tl_ros.adapt.run_round_in_subprocess`` (the adaptation node's path: spawned process,
niced, 1 BLAS/ORT thread; teacher pseudo-labelling included when models/gtsrb_teacher exists) on a
FrameStore of labelled shifted frames. Idle and busy blocks alternate (I B I B ...) so slow drifts of
the shared machine's load hit both; a frame counts as "busy" if a round process was alive when it was
inferred. A contrast condition runs the same round un-niced with 2 threads (full runs only).

    python -m bench.adaptation_interference [--quick] [--bundle DIR] [--results-dir D]
"""

from __future__ import annotations

import threading
import time

import numpy as np

from bench import common

NAME = 'adaptation_interference'


def build_store(root, bundle_path, n: int, seed: int = 0) -> dict:
    """A FrameStore of ``n`` frames with true ('topic') labels: GTSRB test signs under fog 3, or toy."""
    from edge_tl_ros.bundle import load_bundle

    b = load_bundle(bundle_path)
    rng = np.random.default_rng(seed)
    if b.manifest.get('architecture') == 'toy_mean_colour':
        from edge_tl_ros.toy import toy_frames

        imgs, labels = toy_frames(rng, n, size=32, shifted=True)
        src = 'toy frames (colour shift)'
    else:
        from edge_tl_ros.data import DataError, load_gtsrb_npz
        from edge_tl_ros.shifts import apply_shift

        try:
            _, test = load_gtsrb_npz()
        except DataError:  # the round's cost does not depend on what the frames show
            imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, len(b.class_names), n)
            src = 'random frames and labels (GTSRB data absent)'
        else:
            idx = rng.choice(len(test), n, replace=False)
            imgs, labels = apply_shift(test.images[idx], 'fog', 3, seed), test.labels[idx]
            src = 'GTSRB test frames, fog severity 3'
    common.fill_store(root, b, imgs, labels)
    return {'frames': n, 'source': src}


class RoundLoop:
    """Runs rounds back to back in a thread while ``busy`` is set; records when a round process lived."""

    def __init__(self, bundle, state_dir, store_root, nice_level, threads, teacher, sched_idle=False):
        from edge_tl_ros.adapt import AdaptConfig

        self.args = (bundle, state_dir, store_root)
        self.cfg = AdaptConfig(label_sources=('topic', 'teacher'), min_labelled=10)
        self.nice, self.threads, self.teacher, self.sched_idle = nice_level, threads, teacher, sched_idle
        self.busy = threading.Event()
        self.quit = threading.Event()
        self.intervals: list[list[float]] = []  # [start, end] perf_counter of each round process
        self.results = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        from edge_tl_ros.adapt import run_round_in_subprocess

        while not self.quit.is_set():
            if not self.busy.wait(0.05):
                continue
            iv = [time.perf_counter(), None]
            self.intervals.append(iv)
            r = run_round_in_subprocess(*self.args, self.cfg, teacher_bundle=self.teacher,
                                        nice_level=self.nice, threads=self.threads,
                                        sched_idle=self.sched_idle, timeout_s=300)
            iv[1] = time.perf_counter()
            self.results.append(r.summary())

    def alive_at(self, t: float) -> bool:
        return any(a <= t <= (b if b is not None else np.inf) for a, b in self.intervals)

    def wait_idle(self) -> None:
        """Until the last round process has ended."""
        while self.intervals and self.intervals[-1][1] is None:
            time.sleep(0.02)


def measure(engine, frame, loop: RoundLoop, block_s: float, blocks: int, rate: float = 30.0):
    """Alternate idle/busy blocks; returns (idle_ms, busy_ms)."""
    recs = []  # (t, ms, busy_flag)
    period = 1.0 / rate
    for b in range(blocks):
        busy_block = b % 2 == 1
        if busy_block:
            loop.busy.set()
        else:
            loop.busy.clear()
            loop.wait_idle()  # let the last round finish
        t_end = time.perf_counter() + block_s
        t_next = time.perf_counter()
        while time.perf_counter() < t_end:
            now = time.perf_counter()
            if t_next > now:
                time.sleep(t_next - now)
            t0 = time.perf_counter()
            engine.infer(frame, 'bgr')
            t1 = time.perf_counter()
            recs.append((t0, (t1 - t0) * 1e3, busy_block))
            t_next = max(t_next + period, t1)
    loop.busy.clear()
    loop.wait_idle()
    idle = [ms for t, ms, bb in recs if not bb and not loop.alive_at(t)]
    busy = [ms for t, ms, bb in recs if loop.alive_at(t)]
    return np.asarray(idle), np.asarray(busy)


def condition(engine, frame, wd, bundle, teacher, nice: int, threads: int, sched_idle: bool, block_s: float,
              blocks: int) -> tuple[dict, tuple]:
    """One round setting: alternating idle/busy blocks; (its figures, (idle ms, busy ms))."""
    loop = RoundLoop(str(bundle), str(wd / 'state'), str(wd / 'store'), nice, threads, teacher, sched_idle)
    idle, busy = measure(engine, frame, loop, block_s, blocks)
    loop.quit.set()
    secs = [b - a for a, b in loop.intervals if b is not None]
    both = busy.size and idle.size
    return {
        'idle': common.lat_summary(idle), 'busy': common.lat_summary(busy),
        'p50_ratio': common.pct(busy, 50) / common.pct(idle, 50) if both else None,
        'p99_ratio': common.pct(busy, 99) / common.pct(idle, 99) if both else None,
        'rounds': len(secs), 'round_wall_s': common.lat_summary(np.asarray(secs) * 1e3),
        'round_results': loop.results[:3], 'nice': nice, 'threads': threads, 'sched_idle': sched_idle,
    }, (idle, busy)


def run(args) -> dict:
    t_start = time.monotonic()
    try:
        from edge_tl_ros.adapt import run_round_in_subprocess  # noqa: F401
    except ImportError as e:
        raise common.Skip(f'edge_tl_ros.adapt not available ({e})') from e
    from edge_tl_ros.bundle import load_bundle
    from edge_tl_ros.engine import Engine

    bundle, binfo = common.resolve_bundle(args.bundle)
    teacher = str(common.TEACHER) if (common.TEACHER / 'manifest.yaml').is_file() else None
    wd = common.new_workdir(NAME)
    n_frames = 100 if args.quick else 500
    store_info = build_store(wd / 'store', bundle, n_frames)
    engine = Engine(load_bundle(bundle), 'feature_extractor', num_threads=1)
    frame = common.frames_for(640, 480, n=1)[0]
    for _ in range(30):
        engine.infer(frame, 'bgr')
    block_s, blocks = (4.0, 2) if args.quick else (10.0, 6)
    # (label, nice, threads, SCHED_IDLE); the first is the adaptation node's shipped setting
    conditions = [('shipped_idle_nice10_1thread', 10, 1, True)]
    if not args.quick:
        conditions += [('nice10_1thread', 10, 1, False), ('nice0_2threads', 0, 2, False)]
    out, series = {}, {}
    for label, nice, threads, sched_idle in conditions:
        print(f'[{NAME}] {label}: {blocks} alternating {block_s:g} s blocks, rounds on {n_frames} frames '
              f'(teacher: {"yes" if teacher else "no"}) ...', flush=True)
        out[label], series[label] = condition(engine, frame, wd, bundle, teacher, nice, threads, sched_idle,
                                              block_s, blocks)
    main_c = out[conditions[0][0]]
    data = {
        'p99_ratio': main_c['p99_ratio'], 'p50_ratio': main_c['p50_ratio'],
        'idle_p50_ms': main_c['idle']['p50_ms'], 'idle_p99_ms': main_c['idle']['p99_ms'],
        'busy_p50_ms': main_c['busy']['p50_ms'], 'busy_p99_ms': main_c['busy']['p99_ms'],
        'targets': {'p99_ratio<=1.1': main_c['p99_ratio'] is not None and main_c['p99_ratio'] <= 1.1},
        'conditions': out, 'store': store_info, 'teacher_labelling': bool(teacher), 'bundle': binfo,
        'frame': '640x480 bgr8, 30 Hz', 'engine': 'feature_extractor, 1 ORT thread, in-process',
        'definitions': {
            'latency': 'Engine.infer time per frame (preprocess + ORT + head), in this process',
            'busy': 'frames inferred while a round process (run_round_in_subprocess) was alive',
            'idle': 'frames in idle blocks with no round process alive',
            'p99_ratio': 'busy p99 / idle p99 for the shipped round settings (SCHED_IDLE, nice 10, 1 thread)',
            'round_wall_s': 'wall time of run_round_in_subprocess (spawn + imports + round), reported in ms',
        },
    }
    common.cleanup(wd)
    rows = [{'condition': k, 'idle_p50': v['idle']['p50_ms'], 'idle_p99': v['idle']['p99_ms'],
             'busy_p50': v['busy']['p50_ms'], 'busy_p99': v['busy']['p99_ms'], 'p99_ratio': v['p99_ratio'],
             'rounds': v['rounds'], 'round_s': (v['round_wall_s']['p50_ms'] or 0) / 1e3}
            for k, v in out.items()]
    plot(series, args)
    common.report(NAME, data, args, t_start, rows, title=f'bundle {binfo["name"]}')
    return data


def plot(series: dict, args) -> None:
    fig, ax = common.subplots(figsize=(7, 4))
    for label, (idle, busy) in series.items():
        common.plot_cdf(ax, idle, f'{label} idle')
        common.plot_cdf(ax, busy, f'{label} busy')
    ax.set(xscale='log', xlabel='Engine.infer latency (ms, log)', ylabel='CDF')
    ax.legend(fontsize=8)
    common.savefig(fig, NAME, args)


main = common.entry(NAME, run, __doc__)


if __name__ == '__main__':
    raise SystemExit(main())
