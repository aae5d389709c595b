"""``edge-tl evaluate-bag``: run the perception pipeline over a bag in-process (no ROS transport).

Each frame goes through the same code as in the perception node: the message fields are turned into an
array with :func:`edge_tl_ros.imaging.image_view` (a view of the message buffer) or
:func:`~edge_tl_ros.imaging.decode_compressed`, then :meth:`edge_tl_ros.engine.Engine.infer`. The
prediction is compared with the label whose header stamp equals the frame's. Reported: accuracy,
running accuracy over a window of labelled frames, per-frame latency (decode + inference) p50/p99, and a
PNG plot of accuracy against frame index.

``adapt=True`` simulates the adaptation node on the same stream (see :class:`_NodeSim`): frames enter a
temporary frame store as the node keeps them (labelled ones when ``topic`` labels are allowed, sampled
unlabelled ones for teacher or self labels), the node's round (teacher pseudo-labels, head and
adapted-backbone candidates, the gate) runs every ``adapt_every`` trainable frames, accepted pairs are
swapped into the engine (as the perception node's ``reload_head`` would), and rounds are marked on the
plot. Frames are scored with the pair in use when they arrive (prequential), so the plot shows what the
robot would have got. ``eval_fraction`` holds out the end of the bag: it is scored before and after
adapting and never becomes adaptation data.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..imaging import FrameError
from .io import BagError, bag_info, frame_view, pick_image_topic, read_bag, read_labels, stamp_ns


@dataclass
class AdaptRound:
    frame: int  # frame index after which the round ran
    accepted: bool
    head_version: int | None = None
    detail: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    bag: str
    bundle: str
    image_topic: str
    frames: int = 0
    labelled: int = 0
    unlabelled: int = 0
    unknown_labels: int = 0  # labels naming a class the model does not have (counted as wrong)
    frame_errors: dict = field(default_factory=dict)  # FrameError.reason -> count
    accuracy: float = float('nan')
    window: int = 50
    latency_p50_ms: float = float('nan')
    latency_p99_ms: float = float('nan')
    infer_p50_ms: float = float('nan')
    adapt: bool = False
    adapt_rounds: list = field(default_factory=list)
    adapt_note: str | None = None
    per_class: dict = field(default_factory=dict)  # class -> [correct, total]
    label_sources: list | None = None  # what the simulated adaptation node could use
    teacher: str | None = None
    adapt_head_version: int = 0  # the head version in use at the end (0 = the bundle's)
    adapt_store: dict = field(default_factory=dict)  # the simulated store's entries by label source
    adapt_frames: int = 0  # frames the simulated node saw (the held-out ones never)
    heldout_from_frame: int | None = None  # frames from here on were held out (never adaptation data)
    heldout_labelled: int = 0
    heldout_accuracy_before: float = float('nan')  # the bundle as shipped, on the held-out frames
    heldout_accuracy_after: float = float('nan')  # the pair in use after adapting, on the same frames
    # per labelled frame (arrays, not in the JSON summary)
    frame_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)
    running: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        for k in ('frame_index', 'correct', 'running'):
            d.pop(k)
        d['adapt_rounds'] = [asdict(r) if isinstance(r, AdaptRound) else r for r in self.adapt_rounds]
        return d

    def text(self) -> str:
        s = (f'{self.bag}: {self.labelled} labelled of {self.frames} frames, accuracy {self.accuracy:.4f}, '
             f'latency p50 {self.latency_p50_ms:.2f} ms p99 {self.latency_p99_ms:.2f} ms '
             f'(inference p50 {self.infer_p50_ms:.2f} ms)')
        if self.frame_errors:
            s += f', frame errors {self.frame_errors}'
        if self.unknown_labels:
            s += f', {self.unknown_labels} labels of classes the model lacks'
        if self.adapt:
            acc = sum(1 for r in self.adapt_rounds if r.accepted)
            s += f', adaptation rounds {len(self.adapt_rounds)} ({acc} accepted)'
            if self.adapt_note:
                s += f' [{self.adapt_note}]'
            if self.label_sources is not None:
                s += f', labels {",".join(self.label_sources)}, head v{self.adapt_head_version} at the end'
        if self.heldout_from_frame is not None:
            s += (f'\nheld-out frames {self.heldout_from_frame}..{self.frames - 1} ({self.heldout_labelled} '
                  f'labelled, never adaptation data): accuracy before {self.heldout_accuracy_before:.4f} -> '
                  f'after {self.heldout_accuracy_after:.4f}')
        return s


def running_accuracy(correct: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (shorter at the start)."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(correct, np.float64))])
    idx = np.arange(1, len(correct) + 1)
    lo = np.maximum(0, idx - max(1, int(window)))
    return (c[idx] - c[lo]) / (idx - lo)


class _NodeSim:
    """What the adaptation node would do on this stream, in-process, in a temporary state directory.

    The node's data path and round, without ROS: a frame is kept in a :class:`~edge_tl_ros.store.FrameStore`
    (its RGB crop and the bundle backbone's features, as :class:`~edge_tl_ros.adapt.collector.Collector`
    stores them) when it has a label and ``topic`` is a label source, or when the node would sample it
    (``sample_rate_hz`` of bag time, the :class:`~edge_tl_ros.adapt.selection.Selector` keeping about
    ``keep_fraction``). Every ``every`` trainable frames the round of the node's worker runs (teacher
    pseudo-labels, head candidate, adapted-backbone candidate, the gate); teacher labels are written back
    to the store and an accepted (head, backbone) pair is registered and swapped into the engine, as
    ``perception/reload_head`` would do. Nothing outside the temporary directory is written.
    """

    def __init__(self, engine, bundle, every: int = 100, config=None, collector=None, teacher=None,
                 threads: int = 1, provider: str = 'cpu'):
        import tempfile

        from ..adapt import AdaptConfig
        from ..adapt.collector import CollectorConfig
        from ..adapt.selection import Selector
        from ..bundle import HeadRegistry
        from ..engine import Engine
        from ..store import FrameStore

        self.engine, self.bundle = engine, bundle
        self.config = config or AdaptConfig()
        self.config.validate()
        self.collector = collector or CollectorConfig()
        self.collector.validate()
        self.every = max(1, int(every))
        self.teacher = teacher
        self.threads = int(threads)
        self.provider = provider
        self._tmp = tempfile.TemporaryDirectory(prefix='edge_tl_evaluate_')
        root = Path(self._tmp.name)
        size = self.collector.crop_size
        self.store = FrameStore(root / 'store', max_entries=self.collector.max_entries,
                                max_bytes=self.collector.max_bytes, crop_size=(size, size),
                                feature_size=bundle.feature_size)
        self.state_dir = root / 'state'
        self.registry = HeadRegistry(bundle, self.state_dir)
        self.features = Engine(bundle, 'feature_extractor', num_threads=threads)  # the bundle backbone
        self.selector = Selector(self.config.seed)
        self.last_sample: int | None = None
        self.since = 0
        self.version = 0
        self.frames = 0

    def close(self) -> None:
        self._tmp.cleanup()

    def _trainable_unlabelled(self, probs) -> bool:
        srcs = self.config.label_sources
        return (self.teacher is not None and 'teacher' in srcs) or \
            ('self' in srcs and float(np.max(probs)) >= self.config.self_label_threshold)

    def step(self, frame_idx: int, stamp: int, img, order: str, label: str | None) -> AdaptRound | None:
        from ..recent import shrink

        self.frames += 1
        label = label if label is not None and 'topic' in self.config.label_sources else None
        if label is None:
            rate = self.collector.sample_rate_hz
            if rate <= 0 or (self.last_sample is not None and stamp - self.last_sample < 1e9 / rate):
                return None
            self.last_sample = stamp
        crop, small = shrink(img, order, self.store.crop_size, self.features.input_hw)
        pred = self.features.infer(small, order)
        if label is None and not self.selector.select(pred.probs, policy=self.collector.selection,
                                                      rate=self.collector.keep_fraction)[0]:
            return None
        if not self.store.add(stamp, crop, pred.features, pred.probs, label, 'topic' if label else ''):
            return None
        if label is not None or self._trainable_unlabelled(pred.probs):
            self.since += 1
        if self.since < self.every:
            return None
        self.since = 0
        return self.round(frame_idx)

    def round(self, frame_idx: int) -> AdaptRound:
        from ..adapt.worker import _round_job

        job = {'bundle_path': str(self.bundle.root), 'state_dir': str(self.state_dir),
               'store_root': str(self.store.root), 'config': asdict(self.config), 'base_version': None,
               'teacher_bundle': str(self.teacher) if self.teacher else None, 'threads': self.threads}
        try:
            res = _round_job(job)
        except Exception as e:  # noqa: BLE001 - a round that cannot run is a rejected round, as in the node
            return AdaptRound(frame_idx, False, None, {'reason': f'round failed: {type(e).__name__}: {e}'})
        for s, name in res.teacher_labels.items():
            self.store.set_label(s, name, 'teacher')
        version = None
        if res.accepted and res.head is not None:
            head = self.registry.add(res.head, {'reason': res.reason}, backbone=res.backbone)
            if res.backbone is not None or self.engine.backbone_version is not None:
                from ..engine import Engine

                old = self.engine
                self.engine = Engine(self.bundle, old.mode, num_threads=self.threads,
                                     backbone=res.backbone, backbone_version=head.version if res.backbone
                                     else None, provider=self.provider)
                self.engine.swap_head(head)
            else:
                self.engine.swap_head(head)
            if res.backbone is None:
                self.features.swap_head(head)  # the store's probabilities: the head on the bundle backbone
            version = self.version = head.version
        m = res.metrics
        detail = {'reason': res.reason, 'kind': m.get('kind', 'head'), 'label_counts': m.get('label_counts')}
        for k in ('holdout_acc_old', 'holdout_acc_new', 'anchor_acc_old', 'anchor_acc_new', 'n_train'):
            if k in m:
                detail[k] = m[k]
        if m.get('teacher'):
            detail['teacher_labels'] = (m['teacher'] or {}).get('labels')
        return AdaptRound(frame_idx, bool(res.accepted), version, detail)


def evaluate_bag(bag: str | os.PathLike, bundle_dir: str | os.PathLike, mode: str = 'feature_extractor',
                 image_topic: str | None = None, label_topic: str = '/labels', window: int = 50,
                 adapt: bool = False, adapt_every: int = 100, adapt_config=None, num_threads: int = 1,
                 provider: str = 'cpu', max_frames: int | None = None, roi=None,
                 progress: bool = False, teacher=None, collector_config=None, eval_fraction: float = 0.0,
                 class_map: dict | None = None) -> EvalResult:
    """Run the bundle over every frame of ``bag`` and score it against the bag's labels.

    ``adapt``: simulate the adaptation node (:class:`_NodeSim`; ``adapt_config.label_sources`` say which
    labels it may use, ``teacher`` is the teacher bundle path or None). ``eval_fraction``: the last part of
    the bag (this fraction of its frames) is held out: never adaptation data, scored with the bundle as
    shipped (``heldout_accuracy_before``) and with the pair in use after adapting
    (``heldout_accuracy_after``). ``class_map``: bag label name -> bundle class name (None = ignore the
    label), see :mod:`edge_tl_ros.classmap`.
    """
    from ..bundle import load_bundle
    from ..engine import Engine

    if not 0.0 <= float(eval_fraction) < 1.0:
        raise BagError(f'eval_fraction must be in [0, 1), got {eval_fraction}')
    bag = Path(bag).expanduser()
    info = bag_info(bag)
    topic = pick_image_topic(info, image_topic)
    labels = read_labels(bag, label_topic) if label_topic in info.topics else {}
    bundle = load_bundle(bundle_dir)
    if class_map is not None:
        from ..classmap import apply_class_map

        labels = apply_class_map(labels, class_map, bundle.class_names, BagError)
    if adapt and mode == 'full':
        raise BagError('--adapt needs backbone features: use mode feature_extractor or incremental, not full')
    engine = Engine(bundle, mode=mode, num_threads=num_threads, provider=provider)
    res = EvalResult(bag=str(bag), bundle=str(bundle.root), image_topic=topic, window=window, adapt=adapt)
    sim = None
    if adapt:
        try:
            sim = _NodeSim(engine, bundle, adapt_every, config=adapt_config, collector=collector_config,
                           teacher=teacher, threads=num_threads, provider=provider)
        except ModuleNotFoundError as e:
            if e.name != 'edge_tl_ros.adapt':
                raise
            res.adapt_note = 'edge_tl_ros.adapt not available: evaluated without adaptation'
        else:
            res.label_sources = list(sim.config.label_sources)
            res.teacher = str(teacher) if teacher else None

    total = info.topics[topic].count if max_frames is None else min(max_frames, info.topics[topic].count)
    heldout_from = total - int(round(eval_fraction * total)) if eval_fraction > 0 else total
    before = Engine(bundle, mode=mode, num_threads=num_threads, provider=provider) \
        if heldout_from < total else None  # the shipped pair, for the held-out "before"
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc='evaluate', unit='frame', leave=False)
        except ImportError:
            bar = None

    lat, inf_lat, idx_list, corr_list = [], [], [], []
    held_before, held_after = [], []
    per_class: dict[str, list[int]] = {}
    frame_i = -1
    try:
        for m in read_bag(bag, [topic]):
            if max_frames is not None and frame_i + 1 >= max_frames:
                break
            frame_i += 1
            if bar is not None:
                bar.update(1)
            msg = m.msg
            stamp = stamp_ns(msg.header)
            t0 = time.perf_counter()
            try:
                img, order = frame_view(m.msgtype, msg)
            except FrameError as e:
                res.frame_errors[e.reason] = res.frame_errors.get(e.reason, 0) + 1
                continue
            if sim is not None:
                engine = sim.engine  # an accepted round with an adapted backbone replaces the engine
            t1 = time.perf_counter()
            pred = engine.infer(img, order, roi)
            t2 = time.perf_counter()
            lat.append(t2 - t0)
            inf_lat.append(t2 - t1)
            names = pred.head.class_names if pred.head is not None else bundle.class_names
            predicted = names[int(np.argmax(pred.probs))]
            label = labels.get(stamp)
            held = frame_i >= heldout_from
            if sim is not None and not held:
                rnd = sim.step(frame_i, stamp, img, order, label)
                if rnd is not None:
                    res.adapt_rounds.append(rnd)
            if label is None:
                res.unlabelled += 1
                continue
            if label not in names:
                res.unknown_labels += 1
            ok = predicted == label
            idx_list.append(frame_i)
            corr_list.append(ok)
            pc = per_class.setdefault(label, [0, 0])
            pc[0] += int(ok)
            pc[1] += 1
            if held:
                p0 = before.infer(img, order, roi)
                n0 = p0.head.class_names if p0.head is not None else bundle.class_names
                held_before.append(n0[int(np.argmax(p0.probs))] == label)
                held_after.append(ok)
    finally:
        if sim is not None:
            res.adapt_head_version = sim.version
            res.adapt_store = sim.store.label_counts()
            res.adapt_frames = sim.frames
            sim.close()
    if bar is not None:
        bar.close()
    res.frames = frame_i + 1
    res.labelled = len(corr_list)
    res.frame_index = np.asarray(idx_list, np.int64)
    res.correct = np.asarray(corr_list, bool)
    res.running = running_accuracy(res.correct, window)
    res.per_class = per_class
    if heldout_from < total:
        res.heldout_from_frame = int(heldout_from)
        res.heldout_labelled = len(held_after)
        if held_after:
            res.heldout_accuracy_before = float(np.mean(held_before))
            res.heldout_accuracy_after = float(np.mean(held_after))
    if res.labelled:
        res.accuracy = float(res.correct.mean())
    if lat:
        ms = np.asarray(lat) * 1e3
        res.latency_p50_ms = float(np.percentile(ms, 50))
        res.latency_p99_ms = float(np.percentile(ms, 99))
        res.infer_p50_ms = float(np.percentile(np.asarray(inf_lat) * 1e3, 50))
    return res


def plot_result(res: EvalResult, out: str | os.PathLike, title: str | None = None) -> Path:
    """PNG: running and cumulative accuracy against frame index; adaptation rounds as vertical lines."""
    import matplotlib

    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    if res.labelled:
        cum = np.cumsum(res.correct) / np.arange(1, res.labelled + 1)
        ax.plot(res.frame_index, res.running, lw=1.6, label=f'running accuracy (last {res.window} labelled)')
        ax.plot(res.frame_index, cum, lw=1.0, ls='--', color='grey', label='cumulative accuracy')
    seen = set()
    for r in res.adapt_rounds:
        kind = 'accepted' if r.accepted else 'rejected'
        ax.axvline(r.frame, color='tab:green' if r.accepted else 'tab:red', lw=0.9, alpha=0.8,
                   ls='-' if r.accepted else ':',
                   label=None if kind in seen else f'adaptation round ({kind})')
        seen.add(kind)
    if res.heldout_from_frame is not None:
        ax.axvspan(res.heldout_from_frame, max(res.heldout_from_frame, res.frames - 1), color='grey',
                   alpha=0.12, label=f'held out: before {res.heldout_accuracy_before:.3f} -> after '
                         f'{res.heldout_accuracy_after:.3f}')
    ax.set_xlim(0, max(1, res.frames - 1))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('frame index')
    ax.set_ylabel('accuracy')
    ax.grid(alpha=0.3)
    ax.set_title(title or f'{Path(res.bag).name}: accuracy {res.accuracy:.3f}, latency p50 '
                 f'{res.latency_p50_ms:.2f} ms / p99 {res.latency_p99_ms:.2f} ms', fontsize=10)
    if res.labelled or res.adapt_rounds or res.heldout_from_frame is not None:
        ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def write_json(res: EvalResult, out: str | os.PathLike) -> Path:
    from ..atomic import atomic_write_bytes

    def clean(o):
        if isinstance(o, float) and not np.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return atomic_write_bytes(out, json.dumps(clean(res.summary()), indent=2).encode())
