"""``edge-tl evaluate-bag``: run the perception pipeline over a bag in-process (no ROS transport).

Each frame goes through the same code as in the perception node: the message fields are turned into an
array with :func:`edge_tl_ros.imaging.image_view` (a view of the message buffer) or
:func:`~edge_tl_ros.imaging.decode_compressed`, then :meth:`edge_tl_ros.engine.Engine.infer`. The
prediction is compared with the label whose header stamp equals the frame's. Reported: accuracy,
running accuracy over a window of labelled frames, per-frame latency (decode + inference) p50/p99, and a
PNG plot of accuracy against frame index.

``adapt=True`` simulates the adaptation node on the same stream with :func:`edge_tl_ros.adapt.run_round`
(see :class:`_AdaptSim`): every labelled frame becomes a sample, a round runs every ``adapt_every``
labelled frames, accepted heads are swapped into the engine (as the perception node's ``reload_head``
would), and rounds are marked on the plot. Frames are scored with the head in use when they arrive
(prequential), so the plot shows what the robot would have got.
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
        return s


def running_accuracy(correct: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each position (shorter at the start)."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(correct, np.float64))])
    idx = np.arange(1, len(correct) + 1)
    lo = np.maximum(0, idx - max(1, int(window)))
    return (c[idx] - c[lo]) / (idx - lo)


class _AdaptSim:
    """What the adaptation node would do on this stream, in-process and without writing anything.

    Every labelled frame becomes a ``topic``-labelled sample (its backbone features, which do not change
    when heads are swapped); the store keeps the newest ``store_size``. Every ``every`` labelled frames
    (once ``config.min_labelled`` are there) :func:`edge_tl_ros.adapt.run_round` trains a
    candidate head against the current one; an accepted head is swapped into the engine, as
    ``perception/reload_head`` would do, so the following frames are scored with it.
    """

    def __init__(self, engine, bundle, every: int = 100, store_size: int = 2000, config=None):
        from ..adapt import AdaptConfig  # ModuleNotFoundError is handled by the caller

        self.engine, self.bundle = engine, bundle
        self.config = config or AdaptConfig()
        self.config.validate()
        self.every = max(1, int(every))
        self.store_size = max(2, int(store_size))
        self.features: list[np.ndarray] = []
        self.labels: list[str] = []
        self.since = 0
        self.version = 0

    def step(self, frame_idx: int, pred, label: str) -> AdaptRound | None:
        if pred.features is None:
            return None
        self.features.append(np.array(pred.features, np.float32))
        self.labels.append(label)
        if len(self.labels) > self.store_size:
            del self.features[0], self.labels[0]
        self.since += 1
        if self.since < self.every or len(self.labels) < self.config.min_labelled:
            return None
        self.since = 0
        data = (np.stack(self.features), list(self.labels), ['topic'] * len(self.labels))
        from ..adapt import run_round

        res = run_round(self.bundle, data, self.engine.head, self.config)
        version = None
        if res.accepted and res.head is not None:
            self.version += 1
            head = res.head
            head = type(head)(head.weight, head.bias, head.class_names, self.version)
            self.engine.swap_head(head)
            version = self.version
        detail = {'reason': res.reason}
        for k in ('holdout_acc_old', 'holdout_acc_new', 'anchor_acc_old', 'anchor_acc_new', 'n_train'):
            if k in res.metrics:
                detail[k] = res.metrics[k]
        return AdaptRound(frame_idx, bool(res.accepted), version, detail)


def evaluate_bag(bag: str | os.PathLike, bundle_dir: str | os.PathLike, mode: str = 'feature_extractor',
                 image_topic: str | None = None, label_topic: str = '/labels', window: int = 50,
                 adapt: bool = False, adapt_every: int = 100, adapt_config=None, num_threads: int = 1,
                 provider: str = 'cpu', max_frames: int | None = None, roi=None,
                 progress: bool = False) -> EvalResult:
    """Run the bundle over every frame of ``bag`` and score it against the bag's labels."""
    from ..bundle import load_bundle
    from ..engine import Engine

    bag = Path(bag).expanduser()
    info = bag_info(bag)
    topic = pick_image_topic(info, image_topic)
    labels = read_labels(bag, label_topic) if label_topic in info.topics else {}
    bundle = load_bundle(bundle_dir)
    if adapt and mode == 'full':
        raise BagError('--adapt needs backbone features: use mode feature_extractor or incremental, not full')
    engine = Engine(bundle, mode=mode, num_threads=num_threads, provider=provider)
    res = EvalResult(bag=str(bag), bundle=str(bundle.root), image_topic=topic, window=window, adapt=adapt)
    sim = None
    if adapt:
        try:
            sim = _AdaptSim(engine, bundle, adapt_every, config=adapt_config)
        except ModuleNotFoundError as e:
            if e.name != 'edge_tl_ros.adapt':
                raise
            res.adapt_note = 'edge_tl_ros.adapt not available: evaluated without adaptation'

    total = info.topics[topic].count if max_frames is None else min(max_frames, info.topics[topic].count)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc='evaluate', unit='frame', leave=False)
        except ImportError:
            bar = None

    lat, inf_lat, idx_list, corr_list = [], [], [], []
    per_class: dict[str, list[int]] = {}
    frame_i = -1
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
        t1 = time.perf_counter()
        pred = engine.infer(img, order, roi)
        t2 = time.perf_counter()
        lat.append(t2 - t0)
        inf_lat.append(t2 - t1)
        names = pred.head.class_names if pred.head is not None else bundle.class_names
        predicted = names[int(np.argmax(pred.probs))]
        label = labels.get(stamp)
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
        if sim is not None:
            rnd = sim.step(frame_i, pred, label)
            if rnd is not None:
                res.adapt_rounds.append(rnd)
    if bar is not None:
        bar.close()
    res.frames = frame_i + 1
    res.labelled = len(corr_list)
    res.frame_index = np.asarray(idx_list, np.int64)
    res.correct = np.asarray(corr_list, bool)
    res.running = running_accuracy(res.correct, window)
    res.per_class = per_class
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
    ax.set_xlim(0, max(1, res.frames - 1))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('frame index')
    ax.set_ylabel('accuracy')
    ax.grid(alpha=0.3)
    ax.set_title(title or f'{Path(res.bag).name}: accuracy {res.accuracy:.3f}, latency p50 '
                 f'{res.latency_p50_ms:.2f} ms / p99 {res.latency_p99_ms:.2f} ms', fontsize=10)
    if res.labelled or res.adapt_rounds:
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
