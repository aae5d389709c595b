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
conv weights: a backbone change, so the node would have to swap backbones, and the anchor check would
need source images), then the same round on the new features; ``source_accuracy`` = that backbone with
the bundle head on the unshifted test frames.
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

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench import common

NAME = 'adaptation'
SHIFTS = (
    ('night', 3),
    ('night', 5),
    ('fog', 3),
    ('fog', 5),
    ('blur', 3),
    ('blur', 5),
    ('noise', 3),
    ('noise', 5),
)
SIZES = (100, 250, 500)
SOURCES = ('topic', 'teacher', 'self')
ORACLE_EPOCHS = 15
CEILING_EPOCHS = 60  # full fine-tuning on only N frames plateaus here (30 -> 60 -> 100 epochs: +3, +1 points)


def acc(head, feats, labels) -> float:
    return float(np.mean(np.argmax(head.logits(feats), 1) == labels))


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


def student_norm_contrast(student, x_all, pool_ix, test_ix, clean_x, y_pool, y_test, teacher_probs,
                          teacher_classes, cfg, gap) -> dict | None:
    """AdaBN of the student's backbone on the pool frames, then the shipped round on its features."""
    try:
        from onnx import helper, numpy_helper
        import onnx
        import onnxruntime as ort

        from edge_tl_ros import ttn
    except ImportError:
        return None
    from edge_tl_ros.adapt import AdaptConfig, run_round

    stats_path = student.path('norm_stats')
    if stats_path is None:
        return None
    src = ttn.load_norm_stats(stats_path)
    m = ttn.ttn_model(student.files['backbone'], src)
    k_convs = len(src['names'])
    outs = [f'ttn{k}_{s}' for k in range(k_convs) for s in ('mean', 'var')]
    for n in outs:
        m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
    # the batch moments ttn_model computes for each conv output (after the earlier convs are normalised,
    # as AdaBN needs): one batch = the 500 local frames
    r = sess.run(outs, {sess.get_inputs()[0].name: x_all[pool_ix]})
    base = onnx.load(str(student.files['backbone']))
    init = {i.name: i for i in base.graph.initializer}
    off = np.concatenate([[0], np.cumsum(src['sizes'])])
    for k, conv in enumerate(n for n in base.graph.node if n.op_type == 'Conv'):
        mu_s, sd_s = src['mean'][off[k]:off[k + 1]], src['std'][off[k]:off[k + 1]]
        mu_t, sd_t = r[2 * k].ravel(), np.sqrt(r[2 * k + 1].ravel() + ttn.DEFAULT_EPS)
        a = sd_s / sd_t  # conv'(x) = (conv(x) - mu_t) * sd_s / sd_t + mu_s, folded into W and b
        w, b = (numpy_helper.to_array(init[conv.input[j]]) for j in (1, 2))
        init[conv.input[1]].CopyFrom(numpy_helper.from_array((w * a.reshape(-1, 1, 1, 1)).astype(np.float32),
                                                             conv.input[1]))
        init[conv.input[2]].CopyFrom(numpy_helper.from_array(((b - mu_t) * a + mu_s).astype(np.float32),
                                                             conv.input[2]))
    sess = ort.InferenceSession(base.SerializeToString(), providers=['CPUExecutionProvider'])

    def feats(x):
        return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1000]})[0]
                               for i in range(0, len(x), 1000)])

    head0 = student.head
    fp, ft = feats(x_all[pool_ix]), feats(x_all[test_ix])
    n = len(pool_ix)
    lab, keep, _ = round_labels(teacher_probs, teacher_classes, student, fp, cfg)
    rr = run_round(student, (fp[keep], lab[keep], ['teacher'] * int(keep.sum())), head0,
                   AdaptConfig(label_sources=('teacher',)))
    adapted = acc(rr.head, ft, y_test) if rr.head is not None else acc(head0, ft, y_test)
    normed_only = acc(head0, ft, y_test)
    return {'frames': n, 'labelled': int(keep.sum()),
            'label_accuracy': float(np.mean(lab[keep] == y_pool[keep])) if keep.any() else None,
            'normalised_only': normed_only, 'adapted': adapted, 'accepted': bool(rr.accepted),
            'source_accuracy': acc(head0, feats(clean_x), y_test),
            'gap_recovered': gap(adapted), 'gap_recovered_normalised_only': gap(normed_only)}


def round_seconds(student_root, teacher_root, images, labels, class_names, wd: Path) -> dict:
    """Wall time of run_round_in_subprocess on a 500-frame store, pinned to one core."""
    from edge_tl_ros.adapt import AdaptConfig, run_round_in_subprocess
    from edge_tl_ros.bundle import load_bundle
    from edge_tl_ros.engine import Engine
    from edge_tl_ros.store import FrameStore

    b = load_bundle(student_root)
    eng = Engine(b, 'feature_extractor', num_threads=2)
    feats, probs = eng.features_batch(images), eng.predict_batch(images)
    store = FrameStore(wd / 'store', max_entries=max(2000, len(images)))
    for i in range(len(images)):  # teacher present: unlabelled (the round labels them); else topic labels
        lab = None if teacher_root else class_names[int(labels[i])]
        store.add(
            1_000_000 + i, images[i], feats[i], probs[i], label=lab, source='' if teacher_root else 'topic'
        )
    cfg = AdaptConfig(label_sources=('topic', 'teacher'))
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})  # the spawned round inherits the affinity
    try:
        t0 = time.perf_counter()
        r = run_round_in_subprocess(
            student_root,
            wd / 'state',
            wd / 'store',
            cfg,
            teacher_bundle=str(teacher_root) if teacher_root else None,
            nice_level=10,
            threads=1,
            timeout_s=900,
        )
        wall = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, saved)
    return {
        'round_seconds': wall,
        'round_only_seconds': r.metrics.get('seconds'),
        'worker': r.metrics.get('worker'),
        'frames': len(images),
        'teacher_labelling': bool(teacher_root),
        'accepted': r.accepted,
        'reason': r.reason,
        'failed': r.failed,
        'pinned_cpu': cpu,
    }


def run(args) -> dict:
    t_start = time.monotonic()
    try:
        from edge_tl_ros.adapt import AdaptConfig, LabelModel, pseudo_labels, run_round
        from edge_tl_ros.headtrain import train_head
        from edge_tl_ros.shifts import apply_shift
    except ImportError as e:
        return common.skipped(NAME, f'adapt/headtrain/shifts not available ({e})', args, t_start)
    try:
        from edge_tl_ros.data import load_gtsrb_npz

        _, test = load_gtsrb_npz(args.data)
    except (FileNotFoundError, OSError) as e:
        return common.skipped(NAME, f'GTSRB data absent: {e}', args, t_start)
    from edge_tl_ros.bundle import BundleError, load_bundle
    from edge_tl_ros.engine import Engine

    args.student = args.student or args.bundle or str(common.STUDENT)
    try:
        student = load_bundle(args.student)
    except BundleError as e:
        return common.skipped(NAME, f'trained student bundle absent: {e}', args, t_start)
    if len(student.class_names) != len(test.class_names):
        return common.skipped(
            NAME,
            f'student {student.name} has {len(student.class_names)} classes, GTSRB has '
            f'{len(test.class_names)}',
            args,
            t_start,
        )
    teacher_eng, teacher_note, labeler, s_labeler = None, None, None, None
    cfg = AdaptConfig()
    try:
        teacher_eng = Engine(load_bundle(args.teacher), 'feature_extractor', num_threads=2)
        labeler = LabelModel(args.teacher, num_threads=2, test_time_norm=cfg.teacher_test_time_norm,
                                 ttn_batch_size=cfg.teacher_batch_size)
        teacher_note = labeler.note
        # the student side of the round's labelling ensemble (as adapt.labels.label_store makes it)
        s_labeler = (LabelModel(args.student, num_threads=2, test_time_norm=True,
                                    ttn_batch_size=cfg.teacher_batch_size)
                     if cfg.teacher_student_ensemble and cfg.student_test_time_norm else None)
    except BundleError as e:
        teacher_note = f'teacher absent ({e}): teacher label source skipped'
        print(f'[{NAME}] {teacher_note}')
    eng = Engine(student, 'feature_extractor', num_threads=2)
    head0 = student.head
    thr = cfg.self_label_threshold

    quick = args.quick
    shifts = (('fog', 3),) if quick else SHIFTS
    sizes = (100,) if quick else SIZES
    n_max = max(sizes)
    n_pool, n_test = (500, 600) if quick else (2500, 4000)
    perm = np.random.default_rng(0).permutation(len(test))
    if quick:
        perm = perm[: n_pool + n_test + 900]
    pool, tst, rest = perm[:n_pool], perm[n_pool : n_pool + n_test], perm[n_pool + n_test :]
    oracle_idx = np.concatenate([pool, rest])
    y = test.labels
    clean_test_f = eng.features_batch(test.images[tst])
    clean_test_x = eng.prepare_batch(test.images[tst], 'rgb')
    try:
        from edge_tl_ros.training.finetune import finetune_all
    except ImportError as e:  # no torch: the head-only oracle
        finetune_all = None
        print(f'[{NAME}] torch absent ({e}): oracle = head retrained on all target labels')
    src_clean_acc = acc(head0, clean_test_f, y[tst])
    sources = [s for s in SOURCES if s != 'teacher' or teacher_eng is not None]
    results = []
    for shift, sev in shifts:
        t_s = time.perf_counter()
        imgs = apply_shift(test.images[perm], shift, sev, seed=1)
        pos = {int(i): k for k, i in enumerate(perm)}
        feats_all = eng.features_batch(imgs)

        def F(ix):
            return feats_all[[pos[int(i)] for i in ix]]

        def IM(ix):
            return imgs[[pos[int(i)] for i in ix]]

        test_f = F(tst)
        source_only = acc(head0, test_f, y[tst])
        oracle_head_model = train_head(F(oracle_idx), y[oracle_idx], head0, l2_to_prior=1e-4, iters=100)
        oracle_head = acc(oracle_head_model, test_f, y[tst])
        oracle_full, oracle_kind = None, 'head'
        x_all = None
        if finetune_all is not None:
            x_all = eng.prepare_batch(imgs, 'rgb')
            t_ft = time.perf_counter()
            net = finetune_all(student.files['backbone'], head0, x_all[[pos[int(i)] for i in oracle_idx]],
                               y[oracle_idx], epochs=1 if quick else ORACLE_EPOCHS, threads=2)
            oracle_full = float(np.mean(net.predict(x_all[[pos[int(i)] for i in tst]]) == y[tst]))
            oracle_full_source = float(np.mean(net.predict(clean_test_x) == y[tst]))
            oracle_full_s = time.perf_counter() - t_ft
            oracle_kind = 'full'
        oracle = oracle_full if oracle_full is not None else oracle_head

        def gap(v, ref=None):
            ref = oracle if ref is None else ref
            return (v - source_only) / (ref - source_only) if ref - source_only > 1e-6 else None
        pool_f = F(pool)
        t_lab, teacher_info = {}, None
        if teacher_eng is not None:
            y_pool = y[pool[:n_max]]
            plain = teacher_eng.predict_batch(IM(pool[:n_max]), 'rgb')
            # the round's labelling function on the first n frames only for each n (a round with n
            # frames has no other frames to take batch statistics from); the teacher's own probabilities
            # beside it for the label-accuracy figures and the contrasts
            for n in sizes:
                frames = IM(pool[:n])
                names, how = pseudo_labels(frames, labeler, student.head, cfg, pool_f[:n], s_labeler)
                lab, keep = label_indices(names, student)
                t_lab[n] = {'labels': lab, 'keep': keep, 'teacher_probs': labeler.probs(frames), 'how': how}
            tl = t_lab[n_max]
            teacher_acc = float(np.mean(np.argmax(tl['teacher_probs'], 1) == y_pool))
            teacher_kept = float(tl['keep'].mean())
            teacher_kept_acc = (float(np.mean(tl['labels'][tl['keep']] == y_pool[tl['keep']]))
                                if tl['keep'].any() else None)
            teacher_info = {
                'mode': labeler.mode,
                'ensemble': tl['how']['ensemble'],
                'student_side': tl['how'].get('student'),
                'plain_label_accuracy': float(np.mean(np.argmax(plain, 1) == y_pool)),
            }
        else:
            teacher_acc = teacher_kept = teacher_kept_acc = None
        sp = eng.predict_batch(IM(pool[: max(sizes)]), 'rgb')
        s_top, s_conf = np.argmax(sp, 1), sp.max(1)
        entry = {
            'shift': shift,
            'severity': sev,
            'source_only': source_only,
            'oracle': oracle,
            'oracle_kind': oracle_kind,
            'oracle_head': oracle_head,
            'oracle_full': {'accuracy': oracle_full, 'source_accuracy': oracle_full_source,
                            'epochs': 1 if quick else ORACLE_EPOCHS, 'seconds': oracle_full_s}
            if oracle_full is not None else None,
            'teacher_label_accuracy': teacher_acc,
            'teacher_confident_fraction': teacher_kept,
            'teacher_confident_accuracy': teacher_kept_acc,
            'teacher_labeller': teacher_info,
            'runs': [],
        }
        for n in sizes:
            for src in sources:
                f = pool_f[:n]
                if src == 'topic':
                    lab, keep = y[pool[:n]], np.ones(n, bool)
                elif src == 'teacher':
                    lab, keep = t_lab[n]['labels'], t_lab[n]['keep']
                else:
                    lab, keep = s_top[:n], s_conf[:n] >= thr
                t0 = time.perf_counter()
                as_src = 'topic' if src == 'self' else src
                r = run_round(student, (f[keep], lab[keep], [as_src] * int(keep.sum())), head0,
                              AdaptConfig(label_sources=(as_src,)))
                secs = time.perf_counter() - t0
                adapted = acc(r.head, test_f, y[tst]) if r.head is not None else source_only
                accepted = None if src == 'self' else bool(r.accepted)
                deployed = adapted if (accepted or (src == 'self' and r.head is not None)) else source_only
                label_acc = float(np.mean(lab[keep] == y[pool[:n]][keep])) if keep.any() else None
                entry['runs'].append(
                    {
                        'frames': n,
                        'label_source': src,
                        'labelled': int(keep.sum()),
                        'label_accuracy': label_acc,
                        'adapted': adapted,
                        'deployed': deployed if src != 'self' else None,
                        'accepted': accepted,
                        'reason': r.reason,
                        'source_anchor_after': acc(r.head, clean_test_f, y[tst]) if r.head else None,
                        'source_anchor_before': src_clean_acc,
                        'round_s_in_process': secs,
                        'gap_recovered': gap(adapted),
                        'gap_recovered_vs_head_oracle': gap(adapted, oracle_head),
                    }
                )
        if teacher_eng is not None:  # contrasts, same run, n_max frames: what each step of the labelling adds
            contrasts = {
                # before this session's changes: the plain teacher alone, confidence >= 0.9
                'plain_run': plain,
                # the test-time-normalised teacher alone, confidence >= 0.9
                'ttn_only_run': t_lab[n_max]['teacher_probs'],
            }
            for key, probs in contrasts.items():
                pk = probs.max(1) >= 0.9
                top = np.argmax(probs, 1)
                r = run_round(student, (pool_f[:n_max][pk], top[pk], ['teacher'] * int(pk.sum())), head0,
                              AdaptConfig(label_sources=('teacher',)))
                adapted = acc(r.head, test_f, y[tst]) if r.head is not None else source_only
                teacher_info[key] = {
                    'frames': n_max, 'min_confidence': 0.9, 'labelled': int(pk.sum()),
                    'label_accuracy': float(np.mean(top[pk] == y_pool[pk])) if pk.any() else None,
                    'adapted': adapted, 'accepted': bool(r.accepted),
                    'gap_recovered': gap(adapted),
                }
            # the labelling before student_test_time_norm: the current head on the stored features as the
            # student side of the ensemble
            lab, keep, _ = round_labels(t_lab[n_max]['teacher_probs'], labeler.class_names, student,
                                        pool_f[:n_max], cfg)
            r = run_round(student, (pool_f[:n_max][keep], lab[keep], ['teacher'] * int(keep.sum())), head0,
                          AdaptConfig(label_sources=('teacher',)))
            adapted = acc(r.head, test_f, y[tst]) if r.head is not None else source_only
            teacher_info['current_head_student_run'] = {
                'frames': n_max, 'labelled': int(keep.sum()),
                'label_accuracy': float(np.mean(lab[keep] == y_pool[keep])) if keep.any() else None,
                'adapted': adapted, 'accepted': bool(r.accepted), 'gap_recovered': gap(adapted)}
            if x_all is not None:  # the next step, measured: AdaBN of the student's own backbone
                teacher_info['student_norm_run'] = student_norm_contrast(
                    student, x_all, [pos[int(i)] for i in pool[:n_max]], [pos[int(i)] for i in tst],
                    clean_test_x, y[pool[:n_max]], y[tst], t_lab[n_max]['teacher_probs'], labeler.class_names,
                    cfg, gap)
        # the ceilings of n_max local frames, same run
        tl = t_lab.get(n_max)
        entry['ceiling'] = ceilings(
            student, pool_f[:n_max], y[pool[:n_max]],
            tl['labels'] if tl else None, tl['keep'] if tl else None,
            test_f, None if x_all is None else x_all[[pos[int(i)] for i in pool[:n_max]]],
            None if x_all is None else x_all[[pos[int(i)] for i in tst]], y[tst], gap,
            1 if quick else CEILING_EPOCHS, finetune_all)
        c_full = entry['ceiling'].get('full_true')
        for r in entry['runs']:
            r['gap_recovered_vs_full_true_n_max'] = (
                (r['adapted'] - source_only) / (c_full - source_only)
                if c_full is not None and c_full - source_only > 1e-6 and r['frames'] == n_max else None)
        results.append(entry)
        print(
            f'[{NAME}] {shift} {sev}: source-only {source_only:.3f}, oracle {oracle:.3f} '
            f'({time.perf_counter() - t_s:.1f} s)',
            flush=True,
        )
    gap_src = 'teacher' if teacher_eng is not None else 'topic'
    gaps = [
        r['gap_recovered']
        for e in results
        for r in e['runs']
        if r['frames'] == n_max and r['label_source'] == gap_src and r['gap_recovered'] is not None
    ]
    gaps_head = [
        r['gap_recovered_vs_head_oracle']
        for e in results
        for r in e['runs']
        if r['frames'] == n_max and r['label_source'] == gap_src
        and r['gap_recovered_vs_head_oracle'] is not None
    ]

    def mean_of(vals):
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    def contrast_gap(key):
        gs = [e['teacher_labeller'][key]['gap_recovered'] for e in results
              if e['teacher_labeller'] and key in e['teacher_labeller']]
        gs = [g for g in gs if g is not None]
        return float(np.mean(gs)) if gs else None

    wd = common.new_workdir(NAME)
    n_round = 100 if quick else 500
    rs = round_seconds(
        Path(args.student),
        Path(args.teacher) if teacher_eng is not None else None,
        test.images[pool[:n_round]],
        y[pool[:n_round]],
        student.class_names,
        wd,
    )
    data = {
        'gap_recovered': float(np.mean(gaps)) if gaps else None,
        'gap_recovered_label_source': gap_src,
        'gap_recovered_frames': n_max,
        'gap_recovered_plain_teacher': contrast_gap('plain_run'),
        'gap_recovered_ttn_teacher_only': contrast_gap('ttn_only_run'),
        'gap_recovered_vs_head_oracle': float(np.mean(gaps_head)) if gaps_head else None,
        'gap_recovered_student_norm': contrast_gap('student_norm_run'),
        'gap_recovered_current_head_student': contrast_gap('current_head_student_run'),
        'gap_ceiling_head_true': mean_of(e['ceiling'].get('gap_head_true') for e in results),
        'gap_ceiling_full_true': mean_of(e['ceiling'].get('gap_full_true') for e in results),
        'gap_full_teacher': mean_of(e['ceiling'].get('gap_full_teacher') for e in results),
        'gap_recovered_vs_full_true_n_max': mean_of(
            r['gap_recovered_vs_full_true_n_max'] for e in results for r in e['runs']
            if r['frames'] == n_max and r['label_source'] == gap_src),
        'round_seconds': rs['round_seconds'],
        'round': rs,
        'oracle': f'full fine-tuning of the exported student (all weights; Adam 1e-3, cosine, '
        f'{1 if quick else ORACLE_EPOCHS} epochs, batch 128) on all target-labelled frames'
        if finetune_all is not None else 'head retrained on all target-labelled frames (torch absent)',
        'oracle_head': 'head retrained on all target-labelled frames (train_head, l2_to_prior=1e-4, '
        '100 L-BFGS iterations)',
        'source_clean_accuracy': src_clean_acc,
        'shifts': results,
        'teacher_note': teacher_note,
        'split': {'pool': int(n_pool), 'target_test': int(n_test), 'oracle_pool': int(len(oracle_idx))},
        'config': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        'student': student.name,
        'definitions': {
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
        },
    }
    common.cleanup(wd)
    path = common.write_result(NAME, data, args, t_start)
    rows = []
    for e in results:
        row = {'shift': f'{e["shift"]}{e["severity"]}', 'src_only': e['source_only'], 'oracle': e['oracle'],
               'oracle_head': e['oracle_head']}
        for r in e['runs']:
            if r['frames'] == n_max:
                row[r['label_source']] = r['adapted']
                if r['label_source'] == gap_src:
                    row['gap_rec'] = r['gap_recovered']
                    row['anchor_after'] = r['source_anchor_after']
        row['ceil_full'] = e['ceiling'].get('full_true')
        rows.append(row)
    common.print_table(
        rows,
        ['shift', 'src_only', *sources, 'ceil_full', 'oracle_head', 'oracle', 'gap_rec', 'anchor_after'],
        title=f'{NAME} (target accuracy at {n_max} frames; round {rs["round_seconds"]:.1f} s on one core)',
    )
    plot(results, sources, n_max, args)
    print(f'[{NAME}] wrote {path}')
    return data


def plot(results: list, sources, n_max: int, args) -> None:
    """Target accuracy per shift: source-only, adapted per label source at ``n_max`` frames, both oracles."""
    plt = common.plt()
    fig, ax = plt.subplots(figsize=(10, 4.6))
    xs = np.arange(len(results))
    wbar = 0.8 / (len(sources) + 2)
    ax.bar(xs - 0.4 + wbar / 2, [e['source_only'] for e in results], wbar, label='source only')
    for k, s in enumerate(sources):
        ax.bar(
            xs - 0.4 + wbar * (k + 1.5),
            [
                next((r['adapted'] for r in e['runs'] if r['frames'] == n_max and r['label_source'] == s), 0)
                for e in results
            ],
            wbar,
            label=f'adapted ({s}, {n_max})',
        )
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
    ax.set_xticks(xs, [f'{e["shift"]} {e["severity"]}' for e in results])
    ax.set_ylabel('target accuracy')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False,
              markerscale=0.35)
    fig.tight_layout()
    common.savefig(fig, NAME, args)


def parser() -> argparse.ArgumentParser:
    p = common.add_common_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    p.add_argument(
        '--student', default=None, help='student bundle (default --bundle, else models/gtsrb_student)'
    )
    p.add_argument('--teacher', default=str(common.TEACHER))
    p.add_argument(
        '--data', default=None, help='gtsrb32.npz or its folder (default $EDGE_TL_DATA / ../shared/data)'
    )
    return p


def main(argv=None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
