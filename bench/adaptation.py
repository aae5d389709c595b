"""adaptation: source-only vs on-robot head adaptation vs oracle under domain shifts of GTSRB frames.

Protocol (per shift and severity, ``edge_tl_ros.shifts.apply_shift`` on the GTSRB official test set,
one seeded permutation for all shifts):

- local pool: 2500 frames (the robot's collected frames; rounds use the first 100/250/500);
- target test set: 4000 other frames, shifted (never trained on);
- source check: the same 4000 frames unshifted (forgetting of the source domain);
- oracle pool: every remaining frame (pool + rest = 8630) with its true label.

Student backbone features (``Engine.features_batch``) are computed once per shift. A *round* is
``edge_tl_ros.adapt.run_round`` with the shipped ``AdaptConfig`` (head trained with
``headtrain.train_head``, regularised toward the bundle head, anchor replay; accept/reject on a holdout)
on N local frames labelled by one source:

- ``topic``: the true labels (a label topic);
- ``teacher``: pseudo-labels made by the round's own labelling function, ``adapt.pseudo_labels``, with
  models/gtsrb_teacher (test-time normalisation over batches of the round's own N frames; teacher x
  student ensemble, the student side being the bundle's student
  re-normalised the same way over the N frames, ``student_test_time_norm``; kept where its confidence
  >= ``AdaptConfig.teacher_min_confidence``), all with the shipped config; ``teacher_labeller`` beside
  it holds contrasts from the same run at 500 frames: the plain teacher alone and the normalised
  teacher alone (confidence >= 0.9 each), and the ensemble with the current head on the stored
  features as its student side (``current_head_student_run``, the labelling before);
- ``self``: the student's own top-1 where its confidence >= ``AdaptConfig.self_label_threshold``
  (the round refuses to validate on self labels, so they are passed to it as trusted labels here and
  its accept decision is reported as None: this measures what training on them does).

``adapted`` = accuracy of the round's trained head on the target test set; ``deployed`` = adapted if the
round accepted it, else source-only. Oracle (the issue's definition) = full fine-tuning: every weight of
the exported student (backbone and head, ``edge_tl_ros.training.finetune.finetune_all``: Adam 1e-3,
cosine, 15 epochs, batch 128) on ALL 8630 target-labelled frames. ``oracle_head`` beside it = the head
alone retrained (``train_head``, weak pull to the bundle head) on the same frames: the most that head
adaptation on cached features can reach. Without torch the oracle falls back to ``oracle_head``
(``oracle_kind`` says).

``gap_recovered`` = mean over shifts of (adapted - source_only) / (oracle - source_only) at 500 frames
with teacher pseudo-labels (true labels when no teacher exists; ``gap_recovered_label_source`` says);
``gap_recovered_vs_head_oracle`` = the same against ``oracle_head``.

Contrast ``student_norm_run`` (same run, 500 frames, teacher labels; not what the node ships): the
student's own conv activations re-normalised to the 500 local frames' statistics (AdaBN folded into the
conv weights by ``ttn.adapted_backbone``, the backbone the perception node can hot-swap with a head
version; the round does not produce it yet, and its anchor check would need source images), then the
same round on the new features; ``source_accuracy`` = that backbone with the bundle head on the
unshifted test frames.
``ceiling`` per shift (same run, the 500 local frames with their TRUE labels, no holdout): what these
frames allow at most. ``head_true`` = the head alone; ``full_true`` = every weight (``finetune_all``,
60 epochs, where 30 -> 60 -> 100 epochs gained +3 / +1 points); ``full_teacher`` = every weight on the
round's kept teacher labels (what on-robot backbone training would add; not shipped).
``gap_ceiling_*`` are their gap fractions, and ``gap_recovered_vs_full_true_n_max`` measures the round
against ``full_true`` (an oracle restricted to the same frames) instead of the 8630-frame oracle.

``round_seconds``: ``adapt.run_round_in_subprocess`` on a FrameStore of 500 frames (teacher labelling
included when a teacher exists), the whole process pinned to one core, 1 thread.

    python -m bench.adaptation [--quick] [--student DIR] [--teacher DIR] [--data PATH] [--results-dir D]
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench import common

NAME = 'adaptation'
SHIFTS = tuple((shift, sev) for shift in ('night', 'fog', 'blur', 'noise') for sev in (3, 5))
SIZES = (100, 250, 500)
SOURCES = ('topic', 'teacher', 'self')
ORACLE_EPOCHS = 15
CEILING_EPOCHS = 60  # full fine-tuning on only N frames plateaus here (30 -> 60 -> 100 epochs: +3, +1 points)


def acc(head, feats, labels) -> float:
    return float(np.mean(np.argmax(head.logits(feats), 1) == labels))


def label_accuracy(lab, keep, y) -> float | None:
    """Accuracy of the kept labels (None where none is kept)."""
    return float(np.mean(lab[keep] == y[keep])) if keep.any() else None


def labelled_round(student, feats, lab, keep, source: str, test_f, y_test, fallback):
    """The shipped round (``run_round``, bundle head as the prior) on the kept frames of ``feats``, labelled
    ``lab`` by ``source``: (its result, the accuracy of its head on the target test features or
    ``fallback`` where it trained none, the round's seconds)."""
    from edge_tl_ros.adapt import AdaptConfig, run_round

    t0 = time.perf_counter()
    r = run_round(student, (feats[keep], lab[keep], [source] * int(keep.sum())), student.head,
                  AdaptConfig(label_sources=(source,)))
    secs = time.perf_counter() - t0
    return r, (acc(r.head, test_f, y_test) if r.head is not None else fallback), secs


def teacher_round(student, feats, lab, keep, y_pool, test_f, y_test, fallback, gap, **extra) -> dict:
    """A contrast: the round on the kept teacher labels ``lab`` of ``feats``; its figures (``extra`` after
    ``frames``)."""
    r, adapted, _ = labelled_round(student, feats, lab, keep, 'teacher', test_f, y_test, fallback)
    return {'frames': len(feats), **extra, 'labelled': int(keep.sum()),
            'label_accuracy': label_accuracy(lab, keep, y_pool), 'adapted': adapted,
            'accepted': bool(r.accepted), 'gap_recovered': gap(adapted)}


def shipped_round(student, r_head, frames, lab, keep, source, test_imgs, test_f, y_test, source_only, cfg):
    """What the worker ships from the same labels: the head-only result ``r_head`` and the backbone
    candidate (``adapt.backbone_round``: statistics from all ``frames``, head on the kept ones) through
    ``adapt.choose``; the deployed accuracy on the target test set and the candidates' own figures."""
    from edge_tl_ros.adapt import backbone_round, choose
    from edge_tl_ros.engine import Engine

    names = [student.class_names[i] for i in lab[keep]]
    b = backbone_round(student, frames[keep], names, [source] * len(names), student.head, None,
                       replace(cfg, label_sources=(source,)), stats_images=frames)
    pick = choose(r_head, b)

    def test_acc(res):
        if res is None or res.head is None:
            return None
        if res.backbone is None:
            return acc(res.head, test_f, y_test)
        eng = Engine(student, 'feature_extractor', num_threads=2, backbone=res.backbone)
        return acc(res.head, eng.features_batch(test_imgs), y_test)

    deployed = test_acc(pick) if pick.accepted else source_only
    cands = [c for c in (r_head, b) if c is not None and c.head is not None]
    best = max((test_acc(c) for c in cands), default=source_only)
    return {'kind': pick.metrics.get('kind', 'head'), 'accepted': bool(pick.accepted), 'deployed': deployed,
            'reason': pick.reason, 'best_candidate': best,
            'backbone_candidate': None if b is None else {
                'accepted': bool(b.accepted), 'adapted': test_acc(b), 'reason': b.reason,
                'normalised_only_holdout_acc': b.metrics.get('normalised_only_holdout_acc')}}


def label_indices(names, student):
    """Class names (or None) per frame -> (class index per frame or -1, kept mask)."""
    cpos = {c: k for k, c in enumerate(student.class_names)}
    lab = np.array([-1 if c is None else cpos[c] for c in names], np.int64)
    return lab, lab >= 0


def round_labels(teacher_probs, teacher_classes, student, feats, cfg):
    """Labels from given teacher probabilities (the contrasts): the confidence step of the round's
    labelling (``adapt.labels.confident_labels``, the current head on ``feats`` as the student side)."""
    from edge_tl_ros.adapt.labels import confident_labels

    names, how = confident_labels(teacher_probs, teacher_classes, student.head, cfg, feats)
    return (*label_indices(names, student), how)


def ceilings(student, feats, y_true, teacher_lab, teacher_keep, test_f, x, x_test, y_test, gap, epochs,
             finetune_all) -> dict:
    """What N local frames allow at most, same run: true labels for all N, head alone and all weights.

    ``head_true``: the head trained on all N frames with their true labels (no holdout, no accept
    check; the round's regularisation and anchor replay are left out too); ``full_true``: every weight
    fine-tuned on the same frames (``finetune_all``, ``epochs``); ``full_teacher``: every weight on the
    round's kept teacher labels instead. ``x``/``x_test`` may be None (no torch): head only.
    """
    from edge_tl_ros.adapt import AdaptConfig
    from edge_tl_ros.headtrain import train_head

    head = train_head(feats, y_true, student.head, l2_to_prior=AdaptConfig().l2_to_prior)
    out = {'frames': int(len(y_true)), 'head_true': acc(head, test_f, y_test)}
    if finetune_all is not None and x is not None:
        t0 = time.perf_counter()
        net = finetune_all(student.files['backbone'], student.head, x, y_true, epochs=epochs, threads=2)
        out['full_true'] = float(np.mean(net.predict(x_test) == y_test))
        out['full_true_seconds'] = time.perf_counter() - t0
        if teacher_lab is not None and teacher_keep.sum() >= 2:
            net = finetune_all(student.files['backbone'], student.head, x[teacher_keep],
                               teacher_lab[teacher_keep], epochs=epochs, threads=2)
            out['full_teacher'] = float(np.mean(net.predict(x_test) == y_test))
        out['epochs'] = int(epochs)
    for k in ('head_true', 'full_true', 'full_teacher'):
        if k in out:
            out[f'gap_{k}'] = gap(out[k])
    return out


def student_norm_contrast(student, x_all, pool_ix, test_ix, clean_x, src_y, y_pool, y_test, teacher_probs,
                          teacher_classes, cfg, gap) -> dict | None:
    """AdaBN of the student's backbone on the pool frames, then the shipped round on its features."""
    try:
        import onnxruntime as ort

        from edge_tl_ros import ttn
    except ImportError:
        return None
    stats_path = student.path('norm_stats')
    if stats_path is None:
        return None
    # AdaBN, as the shipped code folds it: one batch = the 500 local frames
    model = ttn.adapted_backbone(student.files['backbone'], ttn.load_norm_stats(stats_path), x_all[pool_ix])
    sess = ort.InferenceSession(model, providers=['CPUExecutionProvider'])

    def feats(x):
        return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1000]})[0]
                               for i in range(0, len(x), 1000)])

    fp, ft = feats(x_all[pool_ix]), feats(x_all[test_ix])
    lab, keep, _ = round_labels(teacher_probs, teacher_classes, student, fp, cfg)
    normed_only = acc(student.head, ft, y_test)
    r = teacher_round(student, fp, lab, keep, y_pool, ft, y_test, normed_only, gap)
    r.update(normalised_only=normed_only, source_accuracy=acc(student.head, feats(clean_x), src_y),
             gap_recovered_normalised_only=gap(normed_only))
    keys = ('frames', 'labelled', 'label_accuracy', 'normalised_only', 'adapted', 'accepted',
            'source_accuracy', 'gap_recovered', 'gap_recovered_normalised_only')
    return {k: r[k] for k in keys}


def round_seconds(student_root, teacher_root, images, labels, wd: Path) -> dict:
    """Wall time of run_round_in_subprocess on a 500-frame store, pinned to one core."""
    from edge_tl_ros.adapt import AdaptConfig, run_round_in_subprocess
    from edge_tl_ros.bundle import load_bundle

    # teacher present: unlabelled frames (the round labels them); else topic labels
    common.fill_store(wd / 'store', load_bundle(student_root), images, None if teacher_root else labels)
    cfg = AdaptConfig(label_sources=('topic', 'teacher'))
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})  # the spawned round inherits the affinity
    try:
        t0 = time.perf_counter()
        r = run_round_in_subprocess(student_root, wd / 'state', wd / 'store', cfg,
                                    teacher_bundle=str(teacher_root) if teacher_root else None,
                                    nice_level=10, threads=1, timeout_s=900)
        wall = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, saved)
    return {'round_seconds': wall, 'round_only_seconds': r.metrics.get('seconds'),
            'worker': r.metrics.get('worker'), 'frames': len(images), 'teacher_labelling': bool(teacher_root),
            'accepted': r.accepted, 'reason': r.reason, 'failed': r.failed, 'pinned_cpu': cpu}


def load_models(args, n_classes: int, cfg):
    """(student bundle, teacher engine, teacher labeller, student labeller, teacher note): the round's
    labelling models; the teacher's are None where models/gtsrb_teacher is absent."""
    from edge_tl_ros.adapt import LabelModel
    from edge_tl_ros.bundle import BundleError, load_bundle
    from edge_tl_ros.engine import Engine

    args.student = args.student or args.bundle or str(common.STUDENT)
    try:
        student = load_bundle(args.student)
    except BundleError as e:
        raise common.Skip(f'trained student bundle absent: {e}') from e
    if len(student.class_names) != n_classes:
        raise common.Skip(f'student {student.name} has {len(student.class_names)} classes, GTSRB has '
                          f'{n_classes}')
    try:
        teacher_eng = Engine(load_bundle(args.teacher), 'feature_extractor', num_threads=2)
        labeler = LabelModel(args.teacher, num_threads=2, test_time_norm=cfg.teacher_test_time_norm,
                             ttn_batch_size=cfg.teacher_batch_size)
        # the student side of the round's labelling ensemble (as adapt.labels.label_store makes it)
        s_labeler = (LabelModel(args.student, num_threads=2, test_time_norm=True,
                                ttn_batch_size=cfg.teacher_batch_size)
                     if cfg.teacher_student_ensemble and cfg.student_test_time_norm else None)
        return student, teacher_eng, labeler, s_labeler, labeler.note
    except BundleError as e:
        teacher_note = f'teacher absent ({e}): teacher label source skipped'
        print(f'[{NAME}] {teacher_note}')
        return student, None, None, None, teacher_note


def target_domain(path, student, n_max: int):
    """A user's target data as a domain: an npz in the gtsrb32.npz layout (X_train/y_train = the robot's
    local stream, X_test/y_test = held-out frames, labels in the student's class order)."""
    from edge_tl_ros.data import load_gtsrb_npz

    try:
        tr, te = load_gtsrb_npz(path)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f'[{NAME}] --target {path}: not a gtsrb32.npz-style file ({e})') from None
    n_cls = len(student.class_names)
    for split, what in ((tr, 'y_train'), (te, 'y_test')):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= n_cls):
            raise SystemExit(f'[{NAME}] --target {path}: {what} has labels outside 0..{n_cls - 1} '
                             f'(the student\'s classes)')
    if len(tr) < n_max or len(te) == 0:
        raise SystemExit(f'[{NAME}] --target {path}: needs >= {n_max} X_train frames and some X_test, '
                         f'has {len(tr)} / {len(te)}')
    if tr.images.shape[1:] != te.images.shape[1:]:
        raise SystemExit(f'[{NAME}] --target {path}: X_train and X_test frames differ in size')
    imgs = np.concatenate([tr.images, te.images])
    ids = np.arange(len(imgs))
    y = np.concatenate([tr.labels, te.labels]).astype(np.int64)
    train_ids = ids[:len(tr)]
    return (Path(path).stem, None, ids, imgs, y, train_ids, ids[len(tr):], train_ids)


def mean_of(vals) -> float | None:
    """The mean of the values that are not None (None where there are none)."""
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


# -- streams: i.i.d. vs correlated robot video, and EATA's non-redundancy filter --------------------------
STREAM_COSINES = (0.95, 0.8, 0.5)  # labels.redundancy_max_cosine values measured (1.0 = off)
RUN_LENGTH = (20, 50)  # frames of one class in a row on the correlated stream


def correlated_order(y: np.ndarray, n: int, seed: int = 0, run_length=RUN_LENGTH) -> np.ndarray:
    """Positions into ``y`` of ``n`` frames ordered as a robot sees signs: runs of 20-50 frames of one class
    (a class drawn in proportion to the frames it has left), not i.i.d."""
    rng = np.random.default_rng(seed)
    left = {int(c): list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)}
    out: list[int] = []
    while len(out) < n and left:
        classes = sorted(left)
        w = np.array([len(left[c]) for c in classes], np.float64)
        c = classes[int(rng.choice(len(classes), p=w / w.sum()))]
        k = min(int(rng.integers(run_length[0], run_length[1] + 1)), len(left[c]), n - len(out))
        out += left[c][:k]
        left[c] = left[c][k:]
        if not left[c]:
            del left[c]
    return np.asarray(out, np.int64)


def _deployed(student, res, eval_sets, source_only: dict) -> dict:
    """Accuracy of what a round deploys on each evaluation set ({name: (images, bundle features, y)}):
    its (head, backbone) if accepted, else the source-only figure."""
    from edge_tl_ros.engine import Engine

    if not res.accepted or res.head is None:
        return dict(source_only)
    eng = None if res.backbone is None else Engine(student, 'feature_extractor', num_threads=2,
                                                   backbone=res.backbone)
    return {k: acc(res.head, f if eng is None else eng.features_batch(x), y) for k, (x, f, y) in
            eval_sets.items()}


def stream_contrasts(student, labeler, s_labeler, cfg, streams: dict, eval_sets: dict, source_only: dict,
                     gap) -> dict:
    """The shipped round (head and adapted-backbone candidates, the gate) on teacher labels of each stream
    ({name: (images in stream order, bundle features, true labels)}), with EATA's non-redundancy filter
    off and at each of ``STREAM_COSINES``; deployed accuracy on ``eval_sets`` (``val`` chooses, ``test``
    reports)."""
    from edge_tl_ros.adapt import backbone_round, choose, pseudo_labels
    from edge_tl_ros.adapt.labels import non_redundant

    out = {}
    for name, (frames, feats, y_true) in streams.items():
        _, how = pseudo_labels(frames, labeler, student.head, replace(cfg, redundancy_max_cosine=1.0), feats,
                               s_labeler)
        probs = how['probs']
        top = np.argmax(probs, 1)
        confident = probs.max(1) >= cfg.teacher_min_confidence
        entry = {'frames': int(len(frames)), 'classes': int(len(np.unique(y_true))),
                 'confident': int(confident.sum()), 'variants': {}}
        for cos in (1.0, *STREAM_COSINES):
            keep = non_redundant(probs, confident, cos, cfg.redundancy_momentum)
            r, _, _ = labelled_round(student, feats, top, keep, 'teacher', eval_sets['test'][1],
                                     eval_sets['test'][2], source_only['test'])
            names = [student.class_names[i] for i in top[keep]]
            b = backbone_round(student, frames[keep], names, ['teacher'] * len(names), student.head, None,
                               replace(cfg, label_sources=('teacher',)), stats_images=frames)
            pick = choose(r, b)
            dep = _deployed(student, pick, eval_sets, source_only)
            entry['variants']['off' if cos >= 1.0 else f'{cos:g}'] = {
                'max_cosine': cos, 'labelled': int(keep.sum()),
                'label_accuracy': label_accuracy(top, keep, y_true),
                'classes_labelled': int(len(np.unique(top[keep]))) if keep.any() else 0,
                'accepted': bool(pick.accepted), 'kind': pick.metrics.get('kind', 'head'),
                'deployed': dep, 'gain_val': dep['val'] - source_only['val'],
                'gap_recovered': gap(dep['test'])}
        out[name] = entry
    return out


def stream_summary(results: list, default_cos: float) -> dict:
    """Means over domains of the stream contrasts; the filter value with the best mean validation gain."""
    entries = [e['streams'] for e in results if e.get('streams')]
    if not entries:
        return {}
    keys = list(entries[0]['iid']['variants'])

    def mean(stream, key, field):
        return mean_of(e[stream]['variants'][key][field] for e in entries)

    val = {k: mean_of([mean('iid', k, 'gain_val'), mean('correlated', k, 'gain_val')]) for k in keys}
    best = max(keys, key=lambda k: (val[k], k == 'off'))  # ties: off
    shipped = 'off' if default_cos >= 1.0 else f'{default_cos:g}'
    return {
        'recovered_label_free_iid': mean('iid', 'off', 'gap_recovered'),
        'recovered_label_free_correlated': mean('correlated', shipped, 'gap_recovered')
        if shipped in keys else None,
        'recovered_label_free_correlated_filter_off': mean('correlated', 'off', 'gap_recovered'),
        'gap_recovered_eata_filter': {k: mean('iid', k, 'gap_recovered') for k in keys if k != 'off'},
        'gap_recovered_eata_filter_correlated': {k: mean('correlated', k, 'gap_recovered') for k in keys
                                                 if k != 'off'},
        'min_recovered_correlated': {k: min((e['correlated']['variants'][k]['gap_recovered'] for e in entries
                                             if e['correlated']['variants'][k]['gap_recovered'] is not None),
                                            default=None) for k in keys},
        'val_gain_mean': val, 'best_on_val': best, 'shipped_filter': shipped,
        'stream_classes_mean': {s: mean_of(e[s]['classes'] for e in entries) for s in ('iid', 'correlated')},
    }


def run_streams(args) -> dict:
    """``--streams-only``: the stream contrasts alone on the same shifts and split, the oracle per shift
    read from the last full run (bench/results/adaptation.json); writes adaptation_streams.json."""
    import json

    from edge_tl_ros.adapt import AdaptConfig
    from edge_tl_ros.engine import Engine
    from edge_tl_ros.shifts import apply_shift

    t_start = time.monotonic()
    full = json.loads((common.RESULTS / f'{NAME}.json').read_text())
    oracles = {(e['shift'], e['severity']): e['oracle'] for e in full['shifts']}
    test = common.gtsrb_test(args.data)
    cfg = AdaptConfig()
    student, teacher_eng, labeler, s_labeler, _ = load_models(args, len(test.class_names), cfg)
    if teacher_eng is None:
        raise common.Skip('no teacher: the streams are measured with teacher labels')
    eng = Engine(student, 'feature_extractor', num_threads=2)
    shifts = (('fog', 3),) if args.quick else SHIFTS
    perm = np.random.default_rng(0).permutation(len(test))  # the full run's permutation: the same split
    results = []
    for shift, sev in shifts:
        t_s = time.perf_counter()
        shifted = apply_shift(test.images[perm], shift, sev, seed=1)
        entry = {'shift': shift, 'severity': sev, 'oracle': oracles[(shift, sev)]}
        entry['streams'], entry['source_only'] = domain_streams(
            student, eng, labeler, s_labeler, cfg, shifted, test.labels[perm], 2500, 4000,
            oracles[(shift, sev)], args.quick)
        results.append(entry)
        print(f'[{NAME}] streams {shift} {sev}: {time.perf_counter() - t_s:.1f} s', flush=True)
    data = {**stream_summary(results, cfg.redundancy_max_cosine), 'per_shift': results,
            'oracle_from': f'bench/results/{NAME}.json of {full.get("timestamp")}',
            'definitions': STREAM_DEFINITIONS}
    path = common.write_result(f'{NAME}_streams', data, args, t_start, module=NAME)
    print(f'[{NAME}] wrote {path}')
    return data


def domain_streams(student, eng, labeler, s_labeler, cfg, shifted, y_perm, n_pool, n_test, oracle, quick):
    """The i.i.d. stream (the pool's first 500 frames, as the headline runs), the correlated stream (500
    frames in class runs from the pool's first 1500), validation = the pool's last 1000 frames, test =
    the target test set; -> (stream_contrasts, source-only accuracies)."""
    n = 100 if quick else 500
    n_test = 600 if quick else n_test
    ix_pool = np.arange(n_pool)
    ix_val, ix_test = ix_pool[1500:2500], np.arange(n_pool, n_pool + n_test)
    corr = correlated_order(y_perm[:1500], n, seed=1)
    sets = {}
    for k, ix in (('val', ix_val), ('test', ix_test)):
        sets[k] = (shifted[ix], eng.features_batch(shifted[ix]), y_perm[ix])
    src = {k: acc(student.head, f, y) for k, (_, f, y) in sets.items()}

    def gap(v):
        return (v - src['test']) / (oracle - src['test']) if oracle - src['test'] > 1e-6 else None

    streams = {}
    for k, ix in (('iid', ix_pool[:n]), ('correlated', corr)):
        streams[k] = (shifted[ix], eng.features_batch(shifted[ix]), y_perm[ix])
    return stream_contrasts(student, labeler, s_labeler, cfg, streams, sets, src, gap), src


STREAM_DEFINITIONS = {
    'recovered_label_free_correlated': 'recovered_label_free (teacher labels only, 500 frames, the shipped '
    'round: head and adapted-backbone candidates, gated) on the correlated stream: the 500 frames ordered in '
    'runs of 20-50 frames of one class (drawn from the pool\'s first 1500 frames, about 15 classes), with '
    'the shipped labels.redundancy_max_cosine; gap on the target test set against the full run\'s oracle',
    'recovered_label_free_iid': 'the same on the i.i.d. stream (the pool\'s first 500 frames, as the '
    'headline runs), filter off',
    'gap_recovered_eata_filter': 'the same on the i.i.d. stream per labels.redundancy_max_cosine value',
    'gap_recovered_eata_filter_correlated': 'the same on the correlated stream per value',
    'val_gain_mean': 'mean over shifts and both streams of (deployed - source-only) accuracy on the '
    'validation split (the pool\'s last 1000 frames, target domain, never a round\'s frame nor test): '
    'the choice',
}


def run(args) -> dict:
    if getattr(args, 'streams_only', False):
        return run_streams(args)
    t_start = time.monotonic()
    try:
        from edge_tl_ros.adapt import AdaptConfig, LabelModel, pseudo_labels, run_round  # noqa: F401
        from edge_tl_ros.headtrain import train_head
        from edge_tl_ros.shifts import apply_shift
    except ImportError as e:
        raise common.Skip(f'adapt/headtrain/shifts not available ({e})') from e
    test = common.gtsrb_test(args.data)
    from edge_tl_ros.engine import Engine

    cfg = AdaptConfig()
    student, teacher_eng, labeler, s_labeler, teacher_note = load_models(args, len(test.class_names), cfg)
    eng = Engine(student, 'feature_extractor', num_threads=2)
    head0 = student.head
    quick = args.quick
    shifts = (('fog', 3),) if quick else SHIFTS
    sizes = (100,) if quick else SIZES
    n_max = max(sizes)
    oracle_epochs = 1 if quick else ORACLE_EPOCHS
    n_pool, n_test = (500, 600) if quick else (2500, 4000)
    perm = np.random.default_rng(0).permutation(len(test))
    if quick:
        perm = perm[: n_pool + n_test + 900]
    pool, tst, rest = perm[:n_pool], perm[n_pool : n_pool + n_test], perm[n_pool + n_test :]
    oracle_idx = np.concatenate([pool, rest])
    y = test.labels
    y_test, y_pool = y[tst], y[pool[:n_max]]
    clean_test_f = eng.features_batch(test.images[tst])
    clean_test_x = eng.prepare_batch(test.images[tst], 'rgb')
    try:
        from edge_tl_ros.training.finetune import finetune_all
    except ImportError as e:  # no torch: the head-only oracle
        finetune_all = None
        print(f'[{NAME}] torch absent ({e}): oracle = head retrained on all target labels')
    src_clean_acc = acc(head0, clean_test_f, y_test)
    src_y = y_test  # the source check: the same GTSRB test frames unshifted, in every domain

    def domains():
        """(name, severity or None, ids, images, labels by id, pool ids, test ids, oracle ids) per domain:
        the project's shifts of the GTSRB test frames, then each --target npz (its X_train is the robot's
        local stream and the oracle's labelled pool, X_test the held-out frames)."""
        for shift, sev in shifts:
            shifted = apply_shift(test.images[perm], shift, sev, seed=1)
            yield shift, sev, perm, shifted, test.labels, pool, tst, oracle_idx
        for path in args.target or ():
            yield target_domain(path, student, n_max)
    sources = [s for s in SOURCES if s != 'teacher' or teacher_eng is not None]
    results = []
    for shift, sev, ids, imgs, y_d, d_pool, d_tst, d_oracle in domains():
        t_s = time.perf_counter()
        pos = {int(i): k for k, i in enumerate(ids)}
        y_test, y_pool = y_d[d_tst], y_d[d_pool[:n_max]]

        def at(ix):  # the rows of the shifted frames of these test-set indices
            return [pos[int(i)] for i in ix]

        feats_all = eng.features_batch(imgs)
        test_f, pool_f = feats_all[at(d_tst)], feats_all[at(d_pool)]
        source_only = acc(head0, test_f, y_test)
        oracle_head_model = train_head(feats_all[at(d_oracle)], y_d[d_oracle], head0, l2_to_prior=1e-4,
                                       iters=100)
        oracle_head = acc(oracle_head_model, test_f, y_test)
        oracle_full = x_all = None
        if finetune_all is not None:
            x_all = eng.prepare_batch(imgs, 'rgb')
            t_ft = time.perf_counter()
            net = finetune_all(student.files['backbone'], head0, x_all[at(d_oracle)], y_d[d_oracle],
                               epochs=oracle_epochs, threads=2)
            oracle_full = {'accuracy': float(np.mean(net.predict(x_all[at(d_tst)]) == y_test)),
                           'source_accuracy': float(np.mean(net.predict(clean_test_x) == src_y)),
                           'epochs': oracle_epochs, 'seconds': time.perf_counter() - t_ft}
        oracle = oracle_full['accuracy'] if oracle_full else oracle_head

        def gap(v, ref=None):
            ref = oracle if ref is None else ref
            return (v - source_only) / (ref - source_only) if ref - source_only > 1e-6 else None

        t_lab, teacher_info = {}, None
        teacher_acc = teacher_kept = teacher_kept_acc = None
        if teacher_eng is not None:
            plain = teacher_eng.predict_batch(imgs[at(d_pool[:n_max])], 'rgb')
            # the round's labelling function on the first n frames only for each n (a round with n
            # frames has no other frames to take batch statistics from); the teacher's own probabilities
            # beside it for the label-accuracy figures and the contrasts
            for n in sizes:
                frames = imgs[at(d_pool[:n])]
                names, how = pseudo_labels(frames, labeler, student.head, cfg, pool_f[:n], s_labeler)
                lab, keep = label_indices(names, student)
                t_lab[n] = {'labels': lab, 'keep': keep, 'teacher_probs': labeler.probs(frames), 'how': how}
            tl = t_lab[n_max]
            teacher_acc = float(np.mean(np.argmax(tl['teacher_probs'], 1) == y_pool))
            teacher_kept = float(tl['keep'].mean())
            teacher_kept_acc = label_accuracy(tl['labels'], tl['keep'], y_pool)
            teacher_info = {'mode': labeler.mode, 'ensemble': tl['how']['ensemble'],
                            'student_side': tl['how'].get('student'),
                            'plain_label_accuracy': float(np.mean(np.argmax(plain, 1) == y_pool))}
        sp = eng.predict_batch(imgs[at(d_pool[:n_max])], 'rgb')
        s_top, s_conf = np.argmax(sp, 1), sp.max(1)
        entry = {'shift': shift, 'severity': sev, 'target': sev is None, 'source_only': source_only,
                 'oracle': oracle,
                 'oracle_kind': 'full' if oracle_full else 'head', 'oracle_head': oracle_head,
                 'oracle_full': oracle_full, 'teacher_label_accuracy': teacher_acc,
                 'teacher_confident_fraction': teacher_kept, 'teacher_confident_accuracy': teacher_kept_acc,
                 'teacher_labeller': teacher_info, 'runs': []}
        for n in sizes:
            for src in sources:
                if src == 'topic':
                    lab, keep = y_d[d_pool[:n]], np.ones(n, bool)
                elif src == 'teacher':
                    lab, keep = t_lab[n]['labels'], t_lab[n]['keep']
                else:
                    lab, keep = s_top[:n], s_conf[:n] >= cfg.self_label_threshold
                as_src = 'topic' if src == 'self' else src  # self labels go in as trusted labels
                r, adapted, secs = labelled_round(student, pool_f[:n], lab, keep, as_src, test_f, y_test,
                                                  source_only)
                accepted = None if src == 'self' else bool(r.accepted)
                shipped = None
                if src != 'self':
                    shipped = shipped_round(student, r, imgs[at(d_pool[:n])], lab, keep, as_src,
                                            imgs[at(d_tst)], test_f, y_test, source_only, cfg)
                    shipped['gap_recovered'] = gap(shipped['deployed'])
                entry['runs'].append({
                    'frames': n, 'label_source': src, 'labelled': int(keep.sum()),
                    'label_accuracy': label_accuracy(lab, keep, y_d[d_pool[:n]]), 'adapted': adapted,
                    'deployed': None if src == 'self' else (adapted if accepted else source_only),
                    'accepted': accepted, 'reason': r.reason,
                    'source_anchor_after': acc(r.head, clean_test_f, src_y) if r.head else None,
                    'source_anchor_before': src_clean_acc, 'round_s_in_process': secs,
                    'gap_recovered': gap(adapted), 'gap_recovered_vs_head_oracle': gap(adapted, oracle_head),
                    'shipped': shipped})
        f_max = pool_f[:n_max]
        if teacher_eng is not None:  # contrasts, same run, n_max frames: what each step of the labelling adds
            # before this session's changes: the plain teacher alone; the test-time-normalised teacher
            # alone (confidence >= 0.9 each)
            for key, probs in (('plain_run', plain), ('ttn_only_run', t_lab[n_max]['teacher_probs'])):
                teacher_info[key] = teacher_round(student, f_max, np.argmax(probs, 1), probs.max(1) >= 0.9,
                                                  y_pool, test_f, y_test, source_only, gap,
                                                  min_confidence=0.9)
            # the labelling before student_test_time_norm: the current head on the stored features as the
            # student side of the ensemble
            lab, keep, _ = round_labels(t_lab[n_max]['teacher_probs'], labeler.class_names, student, f_max,
                                        cfg)
            teacher_info['current_head_student_run'] = teacher_round(student, f_max, lab, keep, y_pool,
                                                                     test_f, y_test, source_only, gap)
            if x_all is not None:  # the next step, measured: AdaBN of the student's own backbone
                teacher_info['student_norm_run'] = student_norm_contrast(
                    student, x_all, at(d_pool[:n_max]), at(d_tst), clean_test_x, src_y, y_pool, y_test,
                    t_lab[n_max]['teacher_probs'], labeler.class_names, cfg, gap)
        if teacher_eng is not None and sev is not None and not quick:  # i.i.d. vs correlated stream, EATA
            entry['streams'], _ = domain_streams(student, eng, labeler, s_labeler, cfg, imgs, y_d[ids],
                                                 n_pool, n_test, oracle, quick)
        # the ceilings of n_max local frames, same run
        tl = t_lab.get(n_max)
        entry['ceiling'] = ceilings(
            student, f_max, y_pool, tl['labels'] if tl else None, tl['keep'] if tl else None, test_f,
            None if x_all is None else x_all[at(d_pool[:n_max])], None if x_all is None else x_all[at(d_tst)],
            y_test, gap, 1 if quick else CEILING_EPOCHS, finetune_all)
        c_full = entry['ceiling'].get('full_true')
        for r in entry['runs']:
            r['gap_recovered_vs_full_true_n_max'] = (
                (r['adapted'] - source_only) / (c_full - source_only)
                if c_full is not None and c_full - source_only > 1e-6 and r['frames'] == n_max else None)
        results.append(entry)
        print(f'[{NAME}] {shift} {"(target)" if sev is None else sev}: source-only {source_only:.3f}, '
              f'oracle {oracle:.3f} '
              f'({time.perf_counter() - t_s:.1f} s)', flush=True)
    gap_src = 'teacher' if teacher_eng is not None else 'topic'
    headline = [r for e in results for r in e['runs']  # the runs gap_recovered averages
                if r['frames'] == n_max and r['label_source'] == gap_src]

    def contrast_gap(key):
        return mean_of(e['teacher_labeller'][key]['gap_recovered'] for e in results
                       if e['teacher_labeller'] and key in e['teacher_labeller'])

    wd = common.new_workdir(NAME)
    n_round = 100 if quick else 500
    rs = round_seconds(Path(args.student), Path(args.teacher) if teacher_eng is not None else None,
                       test.images[pool[:n_round]], y[pool[:n_round]], wd)
    def shipped_runs(src, n=None):
        return [(e, r['shipped']) for e in results for r in e['runs']
                if r['label_source'] == src and r.get('shipped') and (n is None or r['frames'] == n)]

    def gate_counts(src):
        # against truth on the target test set: an accepted model that made it worse; a rejected round
        # whose better candidate would have gained at least the margin
        runs = shipped_runs(src)
        fa = sum(1 for e, sh in runs if sh['accepted'] and sh['deployed'] < e['source_only'] - 1e-9)
        fr = sum(1 for e, sh in runs if not sh['accepted'] and sh['best_candidate'] is not None
                 and sh['best_candidate'] >= e['source_only'] + cfg.margin)
        return fa, fr, len(runs)

    lf = [sh['gap_recovered'] for _, sh in shipped_runs('teacher', n_max) if sh['gap_recovered'] is not None]
    tl = [sh['gap_recovered'] for _, sh in shipped_runs('topic', n_max) if sh['gap_recovered'] is not None]
    g_fa, g_fr, g_n = gate_counts('teacher')
    t_fa, t_fr, t_n = gate_counts('topic')
    data = {
        'recovered_label_free': mean_of(lf) if lf else None,
        'min_recovered_label_free': min(lf) if lf else None,
        'recovered_true_labels': mean_of(tl) if tl else None,
        'gate_false_accepts': g_fa, 'gate_false_rejects': g_fr, 'gate_rounds': g_n,
        'gate_true_labels': {'false_accepts': t_fa, 'false_rejects': t_fr, 'rounds': t_n},
        'per_domain': [{'domain': e['shift'] if e['severity'] is None else f'{e["shift"]} {e["severity"]}',
                        'target': e['target'], 'source_only': e['source_only'], 'oracle': e['oracle'],
                        **{f'recovered_{k}': next((r['shipped']['gap_recovered'] for r in e['runs']
                                                   if r['frames'] == n_max and r['label_source'] == src
                                                   and r.get('shipped')), None)
                           for k, src in (('label_free', 'teacher'), ('true_labels', 'topic'))}}
                       for e in results],
        'targets': list(args.target or []),
        'backbone_rounds_deployed': sum(1 for _, sh in shipped_runs('teacher', n_max)
                                        if sh['accepted'] and sh['kind'] == 'backbone'),
        'gap_recovered': mean_of(r['gap_recovered'] for r in headline), 'gap_recovered_label_source': gap_src,
        'gap_recovered_frames': n_max, 'gap_recovered_plain_teacher': contrast_gap('plain_run'),
        'gap_recovered_ttn_teacher_only': contrast_gap('ttn_only_run'),
        'gap_recovered_vs_head_oracle': mean_of(r['gap_recovered_vs_head_oracle'] for r in headline),
        'gap_recovered_student_norm': contrast_gap('student_norm_run'),
        'gap_recovered_current_head_student': contrast_gap('current_head_student_run'),
        'gap_ceiling_head_true': mean_of(e['ceiling'].get('gap_head_true') for e in results),
        'gap_ceiling_full_true': mean_of(e['ceiling'].get('gap_full_true') for e in results),
        'gap_full_teacher': mean_of(e['ceiling'].get('gap_full_teacher') for e in results),
        'gap_recovered_vs_full_true_n_max': mean_of(r['gap_recovered_vs_full_true_n_max'] for r in headline),
        **stream_summary(results, cfg.redundancy_max_cosine),
        'round_seconds': rs['round_seconds'], 'round': rs,
        'oracle': f'full fine-tuning of the exported student (all weights; Adam 1e-3, cosine, '
        f'{oracle_epochs} epochs, batch 128) on all target-labelled frames'
        if finetune_all is not None else 'head retrained on all target-labelled frames (torch absent)',
        'oracle_head': 'head retrained on all target-labelled frames (train_head, l2_to_prior=1e-4, '
        '100 L-BFGS iterations)',
        'source_clean_accuracy': src_clean_acc, 'shifts': results, 'teacher_note': teacher_note,
        'split': {'pool': int(n_pool), 'target_test': int(n_test), 'oracle_pool': int(len(oracle_idx))},
        'config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        'student': student.name,
        'definitions': {
            'recovered_label_free': f'mean over shifts of (deployed - source_only) / (oracle - source_only) '
            f'with teacher labels only at {n_max} frames, deployed = what the worker ships (the head-only '
            'and the adapted-backbone candidate through adapt.choose, each gated on the round holdout and '
            'the anchor set), a rejected round counting as source_only: runs[].shipped',
            'recovered_true_labels': 'the same with label-topic (true) labels',
            'gate_false_accepts': 'teacher-label rounds (all sizes, all shifts) whose deployed model is '
            'below source-only on the target test set',
            'gate_false_rejects': 'teacher-label rounds rejected although a candidate would have gained at '
            'least accept.margin on the target test set',
            'adapted': "accuracy on the shifted target test set of the round's trained head",
            'deployed': 'adapted if the round accepted the head, else source-only (None for self labels)',
            'source_anchor_after': 'accuracy of the adapted head on the same test frames unshifted '
            '(forgetting)',
            'gap_recovered': '(adapted - source_only) / (oracle - source_only)',
            'gap_recovered_vs_head_oracle': '(adapted - source_only) / (oracle_head - source_only), '
            'same runs',
            'gap_recovered_student_norm': 'the same for teacher_labeller.student_norm_run: the student '
            "backbone's conv activations re-normalised to the 500 local frames (AdaBN), then the round",
            'gap_recovered_plain_teacher': 'the same at 500 frames with the plain teacher alone (no '
            'test-time normalisation, no ensemble; confidence >= 0.9: the labelling before these were '
            'added), same run: teacher_labeller.plain_run per shift',
            'gap_ceiling_head_true': f'mean over shifts of ceiling.gap_head_true: the head trained on all '
            f'{n_max} local frames with their true labels (no holdout): what head adaptation on {n_max} '
            'frames reaches with perfect labels',
            'gap_ceiling_full_true': 'the same for ceiling.full_true: every weight fine-tuned on the '
            f'{n_max} frames with their true labels: what training every weight reaches with these '
            'frames and perfect labels (the 60 % target lies above it when it is below 0.6)',
            'gap_full_teacher': f'the same for ceiling.full_teacher: every weight fine-tuned on the round\'s '
            f'kept teacher labels of the {n_max} frames (not shipped: the robot trains heads only)',
            'gap_recovered_vs_full_true_n_max': '(adapted - source_only) / (ceiling.full_true - '
            'source_only): the round measured against the oracle restricted to the same frames',
            'gap_recovered_current_head_student': 'the same with the labelling before '
            'student_test_time_norm: the current head on the stored features is the student side of the '
            'ensemble, same run: teacher_labeller.current_head_student_run per shift',
            'gap_recovered_ttn_teacher_only': 'the same with the test-time-normalised teacher alone (no '
            'ensemble; confidence >= 0.9), same run: teacher_labeller.ttn_only_run per shift',
            **STREAM_DEFINITIONS,
        },
    }
    common.cleanup(wd)
    path = common.write_result(NAME, data, args, t_start)
    rows = []
    for e in results:
        row = {'shift': f'{e["shift"]}{e["severity"] or ""}', 'src_only': e['source_only'],
               'oracle': e['oracle'], 'oracle_head': e['oracle_head']}
        for r in e['runs']:
            if r['frames'] == n_max:
                row[r['label_source']] = r['adapted']
                if r['label_source'] == gap_src:
                    row['gap_rec'], row['anchor_after'] = r['gap_recovered'], r['source_anchor_after']
        row['ceil_full'] = e['ceiling'].get('full_true')
        rows.append(row)
    common.print_table(rows, ['shift', 'src_only', *sources, 'ceil_full', 'oracle_head', 'oracle', 'gap_rec',
                              'anchor_after'], title=f'{NAME} (target accuracy at {n_max} frames; round '
                       f'{rs["round_seconds"]:.1f} s on one core)')
    plot(results, sources, n_max, args)
    print(f'[{NAME}] wrote {path}')
    return data


def plot(results: list, sources, n_max: int, args) -> None:
    """Target accuracy per shift: source-only, adapted per label source at ``n_max`` frames, both oracles."""
    fig, ax = common.subplots(figsize=(10, 4.6))
    xs = np.arange(len(results))
    wbar = 0.8 / (len(sources) + 2)
    ax.bar(xs - 0.4 + wbar / 2, [e['source_only'] for e in results], wbar, label='source only')
    for k, s in enumerate(sources):
        ax.bar(xs - 0.4 + wbar * (k + 1.5),
               [next((r['adapted'] for r in e['runs'] if r['frames'] == n_max and r['label_source'] == s), 0)
                for e in results], wbar, label=f'adapted ({s}, {n_max})')
    wbar_o = wbar / 2
    ax.bar(xs - 0.4 + wbar * (len(sources) + 1) + wbar_o / 2, [e['oracle_head'] for e in results], wbar_o,
           label='oracle (head only)')
    ax.bar(xs - 0.4 + wbar * (len(sources) + 1) + wbar_o * 1.5, [e['oracle'] for e in results], wbar_o,
           label=f'oracle ({results[0]["oracle_kind"] if results else "full"})')
    ceil = [e.get('ceiling', {}).get('full_true') for e in results]
    if any(c is not None for c in ceil):
        ax.scatter([x for x, c in zip(xs, ceil) if c is not None], [c for c in ceil if c is not None],
                   marker='_', s=900, color='k', zorder=3,
                   label=f'all weights, true labels, {n_max} frames (ceiling)')
    ax.set_xticks(xs, [f'{e["shift"]} {e["severity"] or ""}'.strip() for e in results])
    ax.set_ylabel('target accuracy')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False,
              markerscale=0.35)
    fig.tight_layout()
    common.savefig(fig, NAME, args)


def add_args(p) -> None:
    p.add_argument('--student', default=None,
                   help='student bundle (default --bundle, else models/gtsrb_student)')
    p.add_argument('--target', action='append', default=[], metavar='NPZ',
                   help='target data of your own, gtsrb32.npz layout: X_train/y_train = the robot\'s local '
                        'stream (>= 500 frames; 100 with --quick), X_test/y_test = held-out frames; '
                        'repeatable')
    p.add_argument('--streams-only', action='store_true',
                   help='only the i.i.d. / correlated stream contrasts and the EATA filter values, the '
                        'oracle from the last full run; writes adaptation_streams.json')
    common.add_teacher_data_args(p)


main = common.entry(NAME, run, __doc__, add_args)


if __name__ == '__main__':
    raise SystemExit(main())
