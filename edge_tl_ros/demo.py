"""``edge-tl demo``: the whole system on the bundled default, in a few minutes on 2 CPU cores.

1. builds (once, cached) three rosbag2 files from GTSRB test images: a source-domain bag, and two
   shifted-domain bags (default: night, severity 4) from disjoint images - one the robot drives
   through with labels on ``/labels`` (adaptation data), one kept for evaluation (its labels are on a
   topic no node subscribes to, and the adaptation node stores no unlabelled frame while it plays);
2. brings up perception + adaptation in this process (``edge-tl up``'s graph, shipped YAML);
3. replays: source bag -> evaluation bag (before) -> adaptation bag (the adaptation node collects,
   labels and trains; accepted heads are hot-swapped into perception) -> evaluation bag (after);
4. prints a summary (frames, fps, latency, accuracy before/after, head versions) and writes a JSON and
   a PNG plot to ``--out``.

On your own recordings: ``--bag DRIVE --eval-bag HELD_OUT`` (``--image-topic``, ``--label-topic``; an
optional ``--source-bag``): the drive bag plays with its labels (when ``topic`` is a label source), the
evaluation bag plays its images only and is scored against its labels, before and after; no synthetic
shift is built. ``--class-map FILE`` maps your label names to the bundle's class names. ``--shift none``
builds the synthetic bags without a shift.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

CAMERA = '/camera/image'
LABELS = '/labels'
EVAL_LABELS = '/eval/labels'


def _cache_key(args, data_path: Path) -> str:
    st = data_path.stat()
    key = json.dumps([str(data_path), st.st_size, int(st.st_mtime), args.shift, args.severity, args.seed,
                      args.source_frames, args.adapt_frames, args.eval_frames, args.fps, args.upscale])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def build_bags(args, out: Path) -> dict:
    """Write (or reuse) the three demo bags; returns {'source'|'adapt'|'eval': Path}."""
    from .bags.cli import make_frames
    from .bags.io import bag_info, write_bag
    from .data import find_gtsrb_npz, load_gtsrb_npz
    from .shifts import apply_shift

    data_path = find_gtsrb_npz(args.data)
    cache = Path(args.cache) / _cache_key(args, data_path)
    bags = {k: cache / k for k in ('source', 'adapt', 'eval')}
    try:
        if all(bag_info(p).message_count > 0 for p in bags.values()):
            print(f'[demo] using cached bags in {cache}')
            return bags
    except Exception:  # missing or broken cache: rebuild
        pass
    print(f'[demo] building bags from {data_path} into {cache}')
    _, test = load_gtsrb_npz(data_path)
    rng = np.random.default_rng(args.seed)
    n_s, n_a, n_e = args.source_frames, args.adapt_frames, args.eval_frames
    idx = rng.permutation(len(test))[:n_s + n_a + n_e]
    parts = {'source': idx[:n_s], 'adapt': idx[n_s:n_s + n_a], 'eval': idx[n_s + n_a:]}
    t0 = int(time.time() * 1e9)
    for k, (name, ids) in enumerate(parts.items()):
        frames = make_frames(test.images[ids], args.upscale)
        if name != 'source' and args.shift != 'none':
            frames = apply_shift(frames, args.shift, args.severity, seed=args.seed + k)
        labels = [test.class_names[int(y)] for y in test.labels[ids]]
        write_bag(bags[name], frames, labels, fps=args.fps, storage='mcap', image_topic=CAMERA,
                  label_topic=EVAL_LABELS if name == 'eval' else LABELS,
                  start_stamp=t0 + k * 10**12, overwrite=True, progress=True,
                  metadata={'demo_part': name,
                            'shift': None if name == 'source' or args.shift == 'none' else args.shift,
                            'severity': args.severity, 'created_by': 'edge-tl demo'})
    return bags


def user_bags(args, out: Path) -> tuple[dict, dict]:
    """``--bag`` / ``--eval-bag`` / ``--source-bag`` -> ({part: bag path}, {part: how it plays}).

    How a part plays: ``image`` (its image topic), ``labels`` (its label topic or None), ``mapped`` (its
    labels through ``--class-map``, {stamp: bundle class name}). With a class map the drive bag is
    replayed from a copy (``<out>/mapped_drive``) whose labels carry the bundle's names; the node never
    reads the evaluation bag's labels, so those are mapped for scoring only.
    """
    from .bags.io import BagError, bag_info, pick_image_topic, read_labels, relabel_bag
    from .bundle import load_bundle, resolve_bundle_path
    from .classmap import apply_class_map, load_class_map

    if not args.eval_bag:
        raise BagError('--bag needs --eval-bag: a recording the robot does not adapt on, to score before '
                       'and after')
    names = load_bundle(resolve_bundle_path(args.model_bundle)).class_names
    cmap = load_class_map(args.class_map, names) if args.class_map else None
    bags, plays = {}, {}
    for part, path in (('source', args.source_bag), ('adapt', args.bag), ('eval', args.eval_bag)):
        if not path:
            continue
        path = Path(path).expanduser()
        info = bag_info(path)
        image = pick_image_topic(info, args.image_topic)
        has_labels = args.label_topic in info.topics
        if part == 'eval' and not has_labels:
            raise BagError(f'{path}: no label topic {args.label_topic} to score against (--label-topic)')
        labels = read_labels(path, args.label_topic) if has_labels else {}
        mapped = apply_class_map(labels, cmap, names, BagError) if cmap is not None else labels
        if part == 'adapt' and cmap is not None and has_labels:
            mapping = {lab: mapped_name for lab, mapped_name in cmap.items()}
            mapping.update({n: n for n in names if n not in mapping})
            path = relabel_bag(path, out / 'mapped_drive', [image, args.label_topic], args.label_topic,
                               mapping, overwrite=True)
        bags[part] = path
        plays[part] = {'image': image, 'labels': args.label_topic if has_labels else None, 'mapped': mapped,
                       'compressed': info.topics[image].msgtype.endswith('CompressedImage')}
    kinds = {p['compressed'] for p in plays.values()}
    if len(kinds) > 1:
        raise BagError('the bags mix sensor_msgs/Image and CompressedImage frames; use one kind')
    return bags, plays


class Scorer:
    """Collects perception classifications and scores them against a bag's labels, per phase."""

    def __init__(self, node):
        from vision_msgs.msg import Classification

        self.got: dict[int, str] = {}
        self.times: dict[int, float] = {}
        self.lock = threading.Lock()
        node.create_subscription(Classification, '/perception/classification', self._on, 100)

    def _on(self, msg) -> None:
        ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        with self.lock:
            self.got[ns] = msg.results[0].class_id if msg.results else ''
            self.times[ns] = time.monotonic()

    def reset(self) -> None:
        with self.lock:
            self.got.clear()
            self.times.clear()

    def score(self, labels: dict[int, str]) -> tuple[np.ndarray, list[float]]:
        """Correctness per classified frame in stamp order, and receipt times.

        Frames that never reached the node (transport history overwritten under CPU load) or that the
        node dropped under its newest-frame policy are not scored here; the summary counts them."""
        with self.lock:
            stamps = sorted(s for s in labels if s in self.got)
            correct = np.array([self.got.get(s) == labels[s] for s in stamps], bool)
            times = [self.times.get(s, float('nan')) for s in stamps]
        return correct, times


def run_demo(args) -> int:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from .bags.io import read_labels
    from .bags.replay import Replayer
    from .bundle import resolve_bundle_path
    from .data import DataError
    from .nodes.bringup import Bringup

    from .bags.io import BagError
    from .bundle import BundleError
    from .classmap import ClassMapError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.bag:
            bags, plays = user_bags(args, out)
        else:
            if args.eval_bag or args.source_bag:
                raise BagError('--eval-bag and --source-bag go with --bag (your drive)')
            bags = build_bags(args, out)
            plays = {k: {'image': CAMERA, 'labels': EVAL_LABELS if k == 'eval' else LABELS, 'mapped': None,
                         'compressed': False} for k in bags}
    except (DataError, BagError, BundleError, ClassMapError) as e:
        print(f'edge-tl demo: {e}', file=sys.stderr)
        return 2
    domain = 'your drive' if args.bag else args.shift
    state = out / 'state'
    if state.exists():  # every demo starts from the shipped head (v0)
        import shutil

        shutil.rmtree(state)
    student = str(resolve_bundle_path(args.model_bundle))
    teacher = str(resolve_bundle_path(args.teacher_bundle, 'gtsrb_teacher')) if args.teacher_bundle else ''
    sources = '[' + ','.join(args.label_sources.split(',')) + ']'
    extra = ['-p', f"teacher_bundle:='{teacher}'", '-p', f'round.every_n_labels:={args.adapt_every}',
             '-p', f'labels.sources:={sources}', '-p', 'qos_reliability:=reliable', '-p', 'qos_depth:=10']
    compressed = any(p['compressed'] for p in plays.values())
    rclpy.init()
    up = player = ex = spin = None
    try:
        up = Bringup(camera_topic=CAMERA, model_bundle=student, state_dir=str(state), extra_args=extra,
                     use_compressed=True if compressed else None)
        up.spin_in_thread()
        player = rclpy.create_node('demo_player')
        scorer = Scorer(player)
        ex = SingleThreadedExecutor()
        ex.add_node(player)
        spin = threading.Thread(target=ex.spin, daemon=True)
        spin.start()
        perception, adaptation = up.perception, up.adaptation
        print(f'[demo] nodes up: student {perception.bundle.name} (head v{perception.head_version}), '
              f'teacher {teacher or "none"}, label sources {args.label_sources}')
        rounds: list[dict] = []
        phases = []

        def play(name, part, with_labels, kind):
            bag, how = bags[part], plays[part]
            labels = how['mapped'] if how['mapped'] is not None else \
                (read_labels(bag, how['labels']) if how['labels'] else {})
            topics = [how['image']] + ([how['labels']] if with_labels and how['labels'] else [])
            remap = {how['image']: CAMERA + ('/compressed' if how['compressed'] else '')}
            if with_labels and how['labels']:
                remap[how['labels']] = LABELS
            scorer.reset()
            t_start = time.monotonic()
            rep = Replayer(player, bag, rate=args.rate, topics=topics, wait_for_subscribers=5.0,
                           remap={k: v for k, v in remap.items() if k != v})
            stats = rep.run()
            deadline = time.monotonic() + 5
            while len(scorer.got) < len(labels) and time.monotonic() < deadline:
                time.sleep(0.05)
            correct, times = scorer.score(labels)
            classified = len(correct)
            phases.append({'phase': name, 'kind': kind, 'frames': len(labels), 'classified': classified,
                           'coverage': classified / max(len(labels), 1),
                           'accuracy': float(correct.mean()) if len(correct) else 0.0,
                           'head_version': perception.head_version, 'seconds': time.monotonic() - t_start,
                           'replay': stats.summary(), 'correct': correct, 'times': times})
            print(f'[demo] {name:<22} {len(labels):4d} frames, {classified:4d} classified  '
                  f'accuracy {phases[-1]["accuracy"]:.3f}  (head v{perception.head_version})')

        def watch_rounds(stop):
            seen = 0
            while not stop.is_set():
                if adaptation.rounds > seen:
                    seen = adaptation.rounds
                    last = dict(adaptation.last_round or {})
                    last['t'] = time.monotonic()
                    rounds.append(last)
                    verdict = 'accepted' if last.get('accepted') else 'rejected'
                    print(f'[demo]   adaptation round {seen}: {verdict} - {last.get("reason", "")}')
                time.sleep(0.1)

        from rclpy.parameter import Parameter

        rate = float(adaptation.get_parameter('store.sample_rate_hz').value)

        def collect(on: bool):
            # evaluation frames must not reach the adaptation data: while they play the node keeps only
            # labelled frames (store.sample_rate_hz 0), and their labels are on a topic it never reads
            res = adaptation.set_parameters([Parameter('store.sample_rate_hz', value=rate if on else 0.0)])
            if not res[0].successful:
                raise RuntimeError(f'cannot pause collection: {res[0].reason}')

        def evaluate(name, kind):
            collect(False)
            try:
                play(name, 'eval', False, kind)
            finally:
                collect(True)

        stop = threading.Event()
        threading.Thread(target=watch_rounds, args=(stop,), daemon=True).start()
        if 'source' in bags:
            play('source domain', 'source', False, 'source')
        evaluate(f'{domain} before adapting', 'before')
        play(f'{domain} robot drives', 'adapt', True, 'drive')
        deadline = time.monotonic() + args.round_timeout
        while time.monotonic() < deadline and adaptation.round_running:
            time.sleep(0.1)
        if not any(r.get('accepted') for r in rounds):
            print('[demo] no round accepted yet: asking for one more (adapt_now)')
            adaptation.start_round('demo')
            time.sleep(0.5)
            while time.monotonic() < deadline and adaptation.round_running:
                time.sleep(0.1)
        time.sleep(1.0)  # the reload_head call after an accepted round
        evaluate(f'{domain} after adapting', 'after')
        stop.set()
        stats = perception.stats()
        summary = _summary(args, phases, rounds, stats, perception, adaptation)
        summary['bags'] = {k: str(v) for k, v in bags.items()}
        eval_stamps = set(plays['eval']['mapped'] if plays['eval']['mapped'] is not None else
                          read_labels(bags['eval'], plays['eval']['labels']))
        summary['eval_frames_in_store'] = len(eval_stamps & set(adaptation.store.stamps()))
        (out / 'demo_summary.json').write_text(json.dumps(summary, indent=2, default=str))
        plot = _plot(phases, rounds, out / 'demo_accuracy.png', args)
        _print_summary(summary, plot)
        return 0
    except BagError as e:
        print(f'edge-tl demo: {e}', file=sys.stderr)
        return 2
    finally:
        if ex is not None:
            ex.shutdown(timeout_sec=2.0)
        if spin is not None:  # a spin thread still inside rcl's wait at exit aborts the process (rclpy#1484)
            spin.join(timeout=10.0)
        if up is not None:
            up.shutdown()
        if player is not None:
            player.destroy_node()
        rclpy.try_shutdown()


def _summary(args, phases, rounds, stats, perception, adaptation) -> dict:
    total = sum(p['seconds'] for p in phases)
    acc = {p['phase']: round(p['accuracy'], 4) for p in phases}
    kind = {p['kind']: p for p in phases}
    return {
        'published': sum(p['frames'] for p in phases),
        'lost_in_transport': sum(p['frames'] for p in phases) - stats['received'],
        'frames': stats['processed'], 'received': stats['received'], 'dropped': stats['dropped'],
        'rejected': stats['rejected'], 'fps': round(stats['processed'] / max(total, 1e-6), 1),
        'latency_p50_ms': round(stats['latency_p50_ms'], 2),
        'latency_p99_ms': round(stats['latency_p99_ms'], 2),
        'accuracy': acc, 'shift': None if args.bag else args.shift,
        'severity': None if args.bag or args.shift == 'none' else args.severity,
        'domain': 'your drive' if args.bag else args.shift,
        'accuracy_source': kind['source']['accuracy'] if 'source' in kind else None,
        'accuracy_target_before': kind['before']['accuracy'],
        'accuracy_target_after': kind['after']['accuracy'],
        'head_version_start': phases[0]['head_version'], 'head_version_end': perception.head_version,
        'rounds': [{k: r.get(k) for k in ('accepted', 'reason', 'committed_version', 'trigger')}
                   for r in rounds],
        'label_counts': adaptation.store.label_counts(),
        'phases': [{k: v for k, v in p.items() if k not in ('correct', 'times')} for p in phases],
    }


def _print_summary(s: dict, plot: Path) -> None:
    print('\n=== edge_tl_ros demo summary ===')
    print(f'frames classified   {s["frames"]} of {s["published"]} published (received {s["received"]}, '
          f'dropped {s["dropped"]} by newest-frame policy, rejected {s["rejected"]}, '
          f'{s["lost_in_transport"]} lost in transport) at {s["fps"]} fps')
    print(f'latency             p50 {s["latency_p50_ms"]} ms, p99 {s["latency_p99_ms"]} ms '
          '(frame in -> result out)')
    if s['accuracy_source'] is not None:
        print(f'accuracy source     {s["accuracy_source"]:.3f}')
    print(f'accuracy {s["domain"]:<10} before adaptation {s["accuracy_target_before"]:.3f} -> after '
          f'{s["accuracy_target_after"]:.3f}')
    acc = sum(1 for r in s['rounds'] if r['accepted'])
    print(f'adaptation rounds   {len(s["rounds"])} ({acc} accepted); head v{s["head_version_start"]} -> '
          f'v{s["head_version_end"]}; labels {s["label_counts"]}')
    if 'eval_frames_in_store' in s:
        print(f'evaluation frames   {s["eval_frames_in_store"]} in the adaptation store (collection paused '
              'while they play)')
    print(f'plot                {plot}')


def _plot(phases, rounds, path: Path, args) -> Path:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    x0 = 0
    w = 25
    colours = ['tab:green', 'tab:red', 'tab:orange', 'tab:blue']
    for p, c in zip(phases, colours):
        corr = p['correct'].astype(float)
        run = np.convolve(corr, np.ones(w) / w, mode='valid') if len(corr) >= w else corr
        xs = np.arange(len(run)) + x0 + (w - 1 if len(corr) >= w else 0)
        ax.plot(xs, run, color=c, label=f'{p["phase"]} ({p["accuracy"]:.2f})')
        if p['kind'] == 'drive':
            times = np.array(p['times'])
            for r in rounds:
                i = int(np.searchsorted(np.nan_to_num(times, nan=np.inf), r['t']))
                ax.axvline(x0 + i, color='k' if r.get('accepted') else 'grey',
                           ls='-' if r.get('accepted') else ':', lw=1)
        ax.axvline(x0, color='lightgrey', lw=0.5)
        x0 += len(corr)
    ax.set_xlabel('classified frame index (replayed bags, in order)')
    ax.set_ylabel(f'running accuracy ({w} frames)')
    ax.set_ylim(0, 1.02)
    what = 'your bags' if args.bag else f'{args.shift} severity {args.severity}'
    ax.set_title(f'edge_tl_ros demo: {what}; vertical lines = adaptation '
                 'rounds (solid accepted, dotted rejected)', fontsize=9)
    ax.legend(loc='lower left', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(sub: argparse._SubParsersAction) -> None:
    from .shifts import SHIFTS

    p = sub.add_parser('demo', help='replay source + shifted bags through both nodes and adapt',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=None, help='GTSRB npz or its folder (default: $EDGE_TL_DATA or '
                                                '../shared/data)')
    p.add_argument('--out', default='demo_out', help='summary, plot and state (default: %(default)s)')
    p.add_argument('--cache', default='.cache/demo', help='bag cache (default: %(default)s)')
    p.add_argument('--model-bundle', default='', help='student bundle (default: shipped gtsrb_student)')
    p.add_argument('--teacher-bundle', default='gtsrb_teacher',
                   help='teacher bundle for pseudo-labels ("" = none; default: %(default)s)')
    p.add_argument('--label-sources', default='topic,teacher',
                   help='label sources the adaptation node uses (default: %(default)s)')
    p.add_argument('--shift', default='night', choices=sorted(SHIFTS) + ['none'],
                   help='domain shift of the synthetic bags; none = the source domain (default: night)')
    p.add_argument('--severity', type=int, default=4, choices=range(1, 6), help='1..5 (default: 4)')
    p.add_argument('--source-frames', type=int, default=300)
    p.add_argument('--adapt-frames', type=int, default=600)
    p.add_argument('--eval-frames', type=int, default=400)
    p.add_argument('--adapt-every', type=int, default=150, help='labels per adaptation round')
    p.add_argument('--fps', type=float, default=30.0, help='camera frame rate in the bags')
    p.add_argument('--rate', type=float, default=1.0, help='replay rate factor (default: real time)')
    p.add_argument('--upscale', type=int, default=64, help='frame size in the bags (pixels)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--round-timeout', type=float, default=120.0)
    g = p.add_argument_group('your own bags (instead of the synthetic ones)')
    g.add_argument('--bag', default=None, metavar='PATH', help='the drive: the robot adapts while it plays')
    g.add_argument('--eval-bag', default=None, metavar='PATH',
                   help='held-out recording, scored before and after adapting (its labels never reach the '
                        'nodes)')
    g.add_argument('--source-bag', default=None, metavar='PATH', help='optional: a source-domain recording '
                   'played first')
    g.add_argument('--image-topic', default=None, help="image topic in the bags (default: each bag's only "
                   'image topic)')
    g.add_argument('--label-topic', default=LABELS, help='label topic (vision_msgs/Classification) in the '
                   'bags (default: %(default)s)')
    g.add_argument('--class-map', default=None, metavar='FILE',
                   help="YAML/JSON mapping your label names to the bundle's class names")
    p.set_defaults(func=run_demo)
