"""adapt: selection, label sources, accept/reject rounds on the toy bundle, subprocess rounds, labels."""

import dataclasses
import os
import signal

import numpy as np
import pytest

from edge_tl_ros.adapt import AdaptConfig, LabelModel, Selector, gather, run_round, run_round_in_subprocess
from edge_tl_ros.adapt.labels import confident_labels, frames_to_label
from edge_tl_ros.adapt.round import _anchor_split, stratified_split
from edge_tl_ros.bundle import HeadRegistry, load_bundle
from edge_tl_ros.engine import Engine
from edge_tl_ros.headtrain import accuracy, class_weights, train_head
from edge_tl_ros.store import FrameStore
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_features, toy_frames, toy_head


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp('bundle')
    return load_bundle(make_toy_bundle(root / 'toy'))


def names(y):
    return [TOY_CLASSES[i] for i in y]


def shifted(seed, n):
    im, y = toy_frames(np.random.default_rng(seed), n, shifted=True)
    return im, toy_features(im), y


def heads_on_disk(state_dir):
    d = state_dir / 'heads'
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_round_on_shifted_domain_accepted_and_committed(toy, tmp_path):
    reg = HeadRegistry(toy, tmp_path / 'state')
    _, X, y = shifted(1, 90)
    _, Xt, yt = shifted(2, 300)
    # the toy shift is adversarial to the source domain (shifted red looks green): one linear head
    # cannot keep every anchor frame, hence a toy-sized tolerance (30 anchor check frames)
    cfg = AdaptConfig(anchor_tolerance=0.1)
    r = run_round(toy, (X, names(y), ['topic'] * len(y)), reg.load(), cfg)
    m = r.metrics
    assert r.accepted, r.reason
    assert m['holdout_acc_new'] >= m['holdout_acc_old'] + 0.5
    assert m['anchor_acc_old'] - m['anchor_acc_new'] <= 0.1
    assert m['n_train'] + m['n_holdout'] == 90 and m['label_counts']['topic'] == 90
    assert heads_on_disk(tmp_path / 'state') == []  # run_round writes nothing
    head = reg.add(r.head, r.metrics)
    assert head.version == 1 and reg.current_version == 1
    assert reg.index()['versions']['1']['metrics']['holdout_acc_new'] == m['holdout_acc_new']
    assert accuracy(reg.load(), Xt, yt) > 0.9 > 0.1 > accuracy(toy.head, Xt, yt)
    # the next round starts from v1 and has nothing left to gain: rejected, v1 stays
    r2 = run_round(toy, (X, names(y), ['topic'] * len(y)), reg.load(), cfg)
    assert not r2.accepted and 'margin' in r2.reason and r2.metrics['base_version'] == 1
    assert reg.current_version == 1


def test_accepted_round_refits_on_every_labelled_frame(toy):
    _, X, y = shifted(4, 90)
    data = (X, names(y), ['topic'] * len(y))
    on = run_round(toy, data, toy.head, AdaptConfig(anchor_tolerance=0.1))
    off = run_round(toy, data, toy.head, AdaptConfig(anchor_tolerance=0.1, refit_after_accept=False))
    assert on.accepted and off.accepted, (on.reason, off.reason)
    assert 'refit' not in off.metrics and 'refit on all 90 labelled frames' in on.reason
    assert on.metrics['refit']['used'] and on.metrics['refit']['n_train'] == 90
    # the validation is the same (holdout figures of the held-out candidate); the returned head is the
    # round's recipe on all 90 frames (+ the same anchor replay), not the 63-frame candidate
    for k in ('n_train', 'n_holdout', 'holdout_acc_old', 'holdout_acc_new', 'anchor_acc_new'):
        assert on.metrics[k] == off.metrics[k], k
    c = AdaptConfig()
    rf, rl, _, _ = _anchor_split(toy, c)
    w = class_weights(y, 3, c.class_balanced)
    rw = class_weights(rl, 3, c.class_balanced)
    want = train_head(np.concatenate([X, rf]), np.concatenate([y, rl]), toy.head, l2_to_prior=c.l2_to_prior,
                      class_balanced=False,
                      sample_weight=np.concatenate([w / w.sum(), c.anchor_replay * rw / rw.sum()]))
    np.testing.assert_allclose(on.head.weight, want.weight, rtol=1e-4, atol=1e-5)
    assert not np.allclose(on.head.weight, off.head.weight, atol=1e-4)
    assert on.metrics['refit']['anchor_acc'] >= on.metrics['anchor_acc_old'] - 0.1


@pytest.mark.parametrize('case', ['no_replay_forgets_anchor', 'mislabeled', 'huge_margin', 'no_gain',
                                  'too_few'])
def test_bad_rounds_rejected_and_nothing_written(toy, tmp_path, case):
    reg = HeadRegistry(toy, tmp_path / 'state')
    _, X, y = shifted(3, 90)
    cfg = AdaptConfig(anchor_tolerance=0.1)
    if case == 'no_replay_forgets_anchor':  # the shifted domain alone overwrites the source domain
        cfg = AdaptConfig(anchor_replay=0.0, anchor_tolerance=0.1)
        want = 'anchor'
    elif case == 'mislabeled':  # source-domain frames with systematically wrong labels (red<->green...)
        im, y = toy_frames(np.random.default_rng(3), 90)
        X, y = toy_features(im), (y + 1) % 3
        want = 'anchor'  # the (equally mislabeled) holdout improves; the anchor set catches it
    elif case == 'huge_margin':
        y = y.copy()
        y[::10] = (y[::10] + 1) % 3  # 10% label noise: the new head cannot gain a full 1.0
        cfg = AdaptConfig(margin=1.0, anchor_tolerance=0.1)
        want = 'margin'
    elif case == 'no_gain':  # the current head is already right on the source domain
        im, y = toy_frames(np.random.default_rng(3), 90)
        X = toy_features(im)
        want = 'margin'
    else:
        X, y = X[:10], y[:10]
        want = 'not enough labelled'
    r = run_round(toy, (X, names(y), ['topic'] * len(y)), reg.load(), cfg)
    assert not r.accepted and not r.failed
    assert want in r.reason, r.reason
    assert heads_on_disk(tmp_path / 'state') == [] and reg.current_version == 0


def test_label_source_filters(toy, tmp_path):
    """topic labels are right, teacher labels are wrong (permuted): each filter uses only its sources."""
    _, X, y = shifted(4, 120)
    wrong = (y + 1) % 3
    labels = names(y[:60]) + names(wrong[60:])
    sources = ['topic'] * 60 + ['teacher'] * 60

    def run(srcs):
        cfg = AdaptConfig(label_sources=srcs, anchor_tolerance=0.1)
        return run_round(toy, (X, labels, sources), toy.head, cfg)

    r_topic, r_teacher, r_both = run(('topic',)), run(('teacher',)), run(('topic', 'teacher'))
    assert r_topic.metrics['label_counts'] == {'topic': 60, 'teacher': 0, 'self': 0}
    assert r_teacher.metrics['label_counts'] == {'topic': 0, 'teacher': 60, 'self': 0}
    assert r_both.metrics['label_counts'] == {'topic': 60, 'teacher': 60, 'self': 0}
    assert r_topic.accepted
    _, Xt, yt = shifted(5, 200)
    assert accuracy(r_topic.head, Xt, yt) > 0.9
    assert accuracy(r_teacher.head, Xt, yt) < 0.2  # it learned the (wrong) teacher labels
    with pytest.raises(ValueError, match='labels.sources'):
        run_round(toy, (X, labels, sources), toy.head, AdaptConfig(label_sources=('oracle',)))


def test_self_labels_from_store_train_only(toy, tmp_path):
    """'self' pseudo-labels come from confident student predictions and never enter the holdout."""
    eng = Engine(toy)
    st = FrameStore(tmp_path / 'store', crop_size=(16, 16))
    im, y = toy_frames(np.random.default_rng(6), 60)  # source domain: the student is confident and right
    for i in range(60):
        p = eng.infer(im[i], 'rgb')
        st.add(i, im[i], p.features, p.probs)
    st.set_label(0, 'red', 'topic')
    reg = HeadRegistry(toy, tmp_path / 'state')
    only_topic = run_round(toy, st, reg.load(), AdaptConfig(label_sources=('topic',), min_labelled=2))
    assert only_topic.metrics['label_counts'] == {'topic': 1, 'teacher': 0, 'self': 0}
    cfg = AdaptConfig(label_sources=('self',), self_label_threshold=0.5, min_labelled=10)
    r = run_round(toy, st, reg.load(), cfg)
    assert r.metrics['label_counts']['self'] > 30 and r.metrics['label_counts']['topic'] == 0
    assert not r.accepted and 'holdout' in r.reason  # self labels alone cannot validate a head
    cfg = AdaptConfig(label_sources=('self',), self_label_threshold=1.0, min_labelled=10)
    assert run_round(toy, st, reg.load(), cfg).metrics['label_counts']['self'] == 0


def test_new_classes(toy, tmp_path):
    reg = HeadRegistry(toy, tmp_path / 'state')
    _, X, y = shifted(7, 90)
    labels = names(y)
    for i in range(0, 90, 3):
        labels[i] = 'purple'
    r = run_round(toy, (X, labels, ['topic'] * 90), reg.load(), AdaptConfig())
    assert r.metrics['dropped_unknown_class'] == 30 and r.metrics['n_labelled'] == 60
    r2 = run_round(toy, (X, labels, ['topic'] * 90), reg.load(),
                   AdaptConfig(allow_new_classes=True, margin=-1, anchor_tolerance=1))
    assert r2.head.class_names == TOY_CLASSES + ('purple',) and r2.metrics['new_classes'] == ['purple']
    assert reg.add(r2.head, r2.metrics).num_classes == 4
    assert reg.load().class_names[-1] == 'purple'


def test_new_classes_are_bounded(toy, tmp_path, monkeypatch):
    """allow_new_classes admits only valid names, and no more classes than the bound (a 1 MB label
    made a 176 MB head file per version)."""
    import edge_tl_ros.adapt.round as adapt_round

    _, X, y = shifted(8, 90)
    labels = names(y)
    bad = ['x' * 1_000_000, 'tab\there', 'line\nbreak']
    for k, i in enumerate(range(0, 90, 3)):
        labels[i] = bad[k % 3] if k < 9 else f'new{k % 7}'
    cfg = AdaptConfig(allow_new_classes=True)
    ld = gather((X, labels, ['topic'] * 90), toy.head, cfg)
    assert sorted(ld.new_classes) == [f'new{k}' for k in range(7)]
    assert ld.dropped_unknown == 9 and len(ld.labels) == 81
    monkeypatch.setattr(adapt_round, 'MAX_CLASSES', len(TOY_CLASSES) + 2)  # room for two more classes only
    ld = gather((X, labels, ['topic'] * 90), toy.head, cfg)
    assert len(ld.class_names) == len(TOY_CLASSES) + 2 and ld.new_classes == ('new0', 'new1')
    assert set(ld.labels.tolist()) <= set(range(len(TOY_CLASSES) + 2))


def test_select_prefers_uncertain_and_disagreeing():
    ad = Selector(seed=1)
    n = 4000
    confident = np.tile([0.98, 0.01, 0.01], (n, 1))
    unsure = np.tile([0.4, 0.35, 0.25], (n, 1))
    probs = np.concatenate([confident, unsure])
    keep = ad.select(probs, policy='informative', rate=0.2)
    assert 0.15 < keep.mean() < 0.25
    assert keep[n:].mean() > 5 * keep[:n].mean()
    teacher = confident.copy()
    teacher[: n // 2] = [0.01, 0.98, 0.01]  # the teacher disagrees on half of the confident frames
    keep_t = ad.select(confident, teacher_probs=teacher, rate=0.2)
    assert keep_t[: n // 2].mean() > 5 * keep_t[n // 2:].mean()
    uni = ad.select(probs, policy='uniform', rate=0.3)
    assert 0.27 < uni.mean() < 0.33 and abs(uni[:n].mean() - uni[n:].mean()) < 0.05
    with pytest.raises(ValueError):
        ad.select(probs, policy='greedy')


def test_stratified_split_deterministic():
    y = np.repeat([0, 1, 2], [10, 20, 1])
    tr, ho = stratified_split(y, 0.3, seed=3)
    tr2, ho2 = stratified_split(y, 0.3, seed=3)
    np.testing.assert_array_equal(ho, ho2)
    assert sorted(np.concatenate([tr, ho]).tolist()) == list(range(31))
    assert np.sum(y[ho] == 0) == 3 and np.sum(y[ho] == 1) == 6 and np.sum(y[ho] == 2) == 0


def _fill_store(toy, root, n, seed, label=True):
    eng = Engine(toy)
    st = FrameStore(root, crop_size=(16, 16))
    im, y = toy_frames(np.random.default_rng(seed), n, shifted=True)
    for i in range(n):
        p = eng.infer(im[i], 'rgb')
        st.add(10_000 + i, im[i], p.features, p.probs, TOY_CLASSES[y[i]] if label else None,
               'topic' if label else '')
    return st, y


def test_subprocess_round_niced_and_killed_round_writes_nothing(toy, tmp_path):
    st, _ = _fill_store(toy, tmp_path / 'store', 80, 8)
    state = tmp_path / 'state'
    nice_before = os.nice(0)
    cfg = AdaptConfig(anchor_tolerance=0.1)
    r = run_round_in_subprocess(toy.root, state, st.root, cfg, nice_level=7, threads=1)
    assert r.accepted and not r.failed, (r.reason, r.metrics)
    w = r.metrics['worker']
    assert w['pid'] != os.getpid() and w['nice'] == min(19, os.nice(0) + 7) and w['blas_threads'] == '1'
    assert w['nice_at_start'] == w['nice'], 'the interpreter start-up and imports must run niced as well'
    assert os.nice(0) == nice_before  # the caller's own priority is untouched
    assert w['sched_policy'] == 'other'
    if hasattr(os, 'SCHED_IDLE'):  # Linux: the whole worker runs only on otherwise idle CPU time
        r_idle = run_round_in_subprocess(toy.root, state, st.root, cfg, nice_level=7, threads=1,
                                         sched_idle=True)
        w_idle = r_idle.metrics['worker']
        assert r_idle.accepted and w_idle['sched_policy'] == 'idle', w_idle
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's policy is untouched
    assert heads_on_disk(state) == []  # the worker never writes; the caller commits
    # killed mid-round: reported as failed, nothing written
    r2 = run_round_in_subprocess(toy.root, state, st.root, AdaptConfig(),
                                 on_start=lambda pid: os.kill(pid, signal.SIGKILL))
    assert r2.failed and not r2.accepted and 'died' in r2.reason
    assert heads_on_disk(state) == []
    # an error inside the worker is reported, not raised
    r3 = run_round_in_subprocess(toy.root, state, st.root, AdaptConfig(), base_version=7)
    assert r3.failed and 'version 7' in r3.reason


def store_probs(model, store):
    """(stamps, probs) of ``model`` for the store's unlabelled entries, batched as the round batches them."""
    found, imgs, context = frames_to_label(store, store.entries(),
                                           min_batch=model.ttn_batch_size if model.ttn is not None else 0)
    return found, model.probs(imgs, context)


def teacher_top(model, store) -> dict:
    """stamp -> the teacher's top class for the store's unlabelled entries (no confidence cut)."""
    stamps, probs = store_probs(model, store)
    return {int(s): model.class_names[int(np.argmax(p))] for s, p in zip(stamps, probs)}


def as_dict(stamps, names) -> dict:
    return {int(s): n for s, n in zip(stamps, names) if n is not None}


def test_teacher_labels_in_subprocess_round(toy, tmp_path):
    """A teacher that knows the shifted domain labels unlabelled stored crops; the round uses them."""
    _, X, y = shifted(9, 200)
    teacher_head = train_head(X, y, toy_head(), l2_to_prior=1e-3)
    teacher = make_toy_bundle(tmp_path / 'teacher', head=teacher_head, name='teacher', with_full=False)
    st, y_store = _fill_store(toy, tmp_path / 'store', 80, 10, label=False)
    lab = teacher_top(LabelModel(teacher), st)
    assert len(lab) == 80
    agree = np.mean([lab[10_000 + i] == TOY_CLASSES[y_store[i]] for i in range(80)])
    assert agree > 0.9
    topic_only = run_round_in_subprocess(toy.root, tmp_path / 'state', st.root,
                                         AdaptConfig(label_sources=('topic',)), teacher_bundle=teacher)
    assert not topic_only.accepted and topic_only.teacher_labels == {}
    r = run_round_in_subprocess(toy.root, tmp_path / 'state', st.root,
                                AdaptConfig(label_sources=('teacher',), anchor_tolerance=0.1,
                                            teacher_student_ensemble=False, teacher_min_confidence=0.0),
                                teacher_bundle=teacher)
    assert r.accepted, r.reason
    assert r.metrics['label_counts']['teacher'] == 80 and len(r.teacher_labels) == 80
    assert r.teacher_labels == lab  # the round labels exactly as the labeller does in-process
    # test-time normalisation is on by default; this teacher has no norm stats: plain labels, and why
    assert r.metrics['teacher']['mode'] == 'plain' and r.metrics['teacher']['labels'] == 80
    assert 'norm_stats' in r.metrics['teacher']['note']


def test_teacher_min_confidence_keeps_only_confident_labels(toy, tmp_path):
    """Under a domain shift the teacher is wrong as well; only its confident answers become labels."""
    _, X, y = shifted(9, 200)
    teacher_head = train_head(X, y, toy_head(), l2_to_prior=1e-3)
    teacher = make_toy_bundle(tmp_path / 'teacher', head=teacher_head, name='teacher', with_full=False)
    st, _ = _fill_store(toy, tmp_path / 'store', 60, 10, label=False)
    stamps, probs = store_probs(LabelModel(teacher), st)
    conf = probs.max(1)
    cut = float(np.median(conf))
    r = run_round_in_subprocess(toy.root, tmp_path / 'state', st.root,
                                AdaptConfig(label_sources=('teacher',), teacher_min_confidence=cut,
                                            teacher_student_ensemble=False),
                                teacher_bundle=teacher)
    assert set(r.teacher_labels) == {int(s) for s, c in zip(stamps, conf) if c >= cut}
    assert 0 < len(r.teacher_labels) < 60
    # the round applies AdaptConfig.teacher_min_confidence: above every confidence, nothing is labelled
    r = run_round_in_subprocess(toy.root, tmp_path / 'state', st.root,
                                AdaptConfig(label_sources=('teacher',), teacher_min_confidence=1.0),
                                teacher_bundle=teacher)
    assert not r.accepted and r.teacher_labels == {} and 'labelled' in r.reason, r.reason
    with pytest.raises(ValueError, match='teacher_min_confidence'):
        AdaptConfig(teacher_min_confidence=1.5).validate()


def test_subprocess_round_labels_with_a_test_time_normalised_teacher(toy, tmp_path):
    """A teacher with norm stats labels in the round process exactly as the labeller does in-process."""
    from edge_tl_ros.ttn import add_to_bundle

    _, X, y = shifted(9, 200)
    teacher = make_toy_bundle(tmp_path / 'teacher', head=train_head(X, y, toy_head(), l2_to_prior=1e-3),
                              name='teacher', with_full=False, conv=True)
    add_to_bundle(teacher, toy_frames(np.random.default_rng(3), 200)[0], threads=1, source='toy frames')
    st, y_store = _fill_store(toy, tmp_path / 'store', 80, 10, label=False)
    local = LabelModel(teacher, test_time_norm=True, ttn_batch_size=32)
    assert local.mode == 'test_time_norm'
    want = teacher_top(local, st)
    r = run_round_in_subprocess(toy.root, tmp_path / 'state', st.root,
                                AdaptConfig(label_sources=('teacher',), teacher_min_confidence=0.0,
                                            teacher_batch_size=32, anchor_tolerance=0.1,
                                            teacher_student_ensemble=False),
                                teacher_bundle=teacher)
    assert r.metrics['teacher'] == {'mode': 'test_time_norm', 'labels': 80, 'note': None, 'ensemble': False,
                                    'candidates': 80, 'confident': 80, 'kept': 80, 'redundant': 0}, r.metrics
    assert r.teacher_labels == want and len(want) == 80
    # and the labels are mostly right: the teacher knows the shifted domain
    assert np.mean([want[10_000 + i] == TOY_CLASSES[y_store[i]] for i in range(80)]) > 0.8


def test_subprocess_round_student_side_is_the_renormalised_student(tmp_path):
    """student_test_time_norm: the ensemble's student side is the bundle's student re-normalised to the
    stored frames (as the teacher is), computed in the round process exactly as in-process; without
    norm stats in the student bundle, or switched off, the current head on the stored features."""
    from edge_tl_ros.adapt import ensemble_probs
    from edge_tl_ros.engine import softmax
    from edge_tl_ros.ttn import add_to_bundle

    src = toy_frames(np.random.default_rng(3), 200)[0]
    student_root = make_toy_bundle(tmp_path / 'student', name='student', conv=True)
    add_to_bundle(student_root, src, threads=1, source='toy frames')
    student = load_bundle(student_root)
    _, X, y = shifted(9, 200)
    teacher = make_toy_bundle(tmp_path / 'teacher', head=train_head(X, y, toy_head(), l2_to_prior=1e-3),
                              name='teacher', with_full=False, conv=True)
    add_to_bundle(teacher, src, threads=1, source='toy frames')
    st, _ = _fill_store(student, tmp_path / 'store', 80, 10, label=False)
    cfg = AdaptConfig(label_sources=('teacher',), teacher_min_confidence=0.9, teacher_batch_size=32,
                      anchor_tolerance=0.1)
    # in-process: teacher and student, both re-normalised over the same stored crops
    t_stamps, p_t = store_probs(LabelModel(teacher, test_time_norm=True, ttn_batch_size=32), st)
    s_lab = LabelModel(student_root, test_time_norm=True, ttn_batch_size=32)
    s_stamps, p_s = store_probs(s_lab, st)
    assert s_lab.last_mode == 'test_time_norm' and np.array_equal(s_stamps, t_stamps)
    arr = st.entries()
    feats = arr.features[[list(arr.stamps).index(int(s)) for s in t_stamps]]
    # the toy shift moves colours: re-normalised, the student's probabilities differ from its plain ones
    assert np.abs(p_s - softmax(student.head.logits(feats))).max() > 0.05
    want = as_dict(t_stamps, confident_labels(p_t, TOY_CLASSES, student.head, cfg, feats, p_s)[0])
    ens = ensemble_probs(p_t, p_s)
    assert want == {int(s): TOY_CLASSES[int(np.argmax(p))] for s, p in zip(t_stamps, ens) if p.max() >= 0.9}

    r = run_round_in_subprocess(student_root, tmp_path / 'state', st.root, cfg, teacher_bundle=teacher)
    assert r.metrics['teacher']['ensemble'] and r.metrics['teacher']['student'] == 'test_time_norm', r.metrics
    assert r.teacher_labels == want and len(want) > 40
    # switched off: the current head on the stored features
    off = run_round_in_subprocess(student_root, tmp_path / 'state', st.root,
                                  dataclasses.replace(cfg, student_test_time_norm=False),
                                  teacher_bundle=teacher)
    assert off.metrics['teacher']['student'] == 'current_head'
    plain = as_dict(t_stamps, confident_labels(p_t, TOY_CLASSES, student.head, cfg, feats)[0])
    assert off.teacher_labels == plain and plain != want  # the student side moved the confidence cut
    # a student bundle without norm stats: the current head, and why
    bare = make_toy_bundle(tmp_path / 'bare', name='bare', conv=True)
    r3 = run_round_in_subprocess(bare, tmp_path / 'state_bare', st.root, cfg, teacher_bundle=teacher)
    assert r3.metrics['teacher']['student'] == 'current_head'
    assert 'norm_stats' in r3.metrics['teacher']['student_note'], r3.metrics['teacher']


def test_teacher_student_ensemble_labels(toy):
    """Geometric mean of teacher and head probabilities: agreement is confident, disagreement is not."""
    from edge_tl_ros.adapt import ensemble_probs
    from edge_tl_ros.engine import softmax

    p_t = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], np.float32)
    p_s = np.array([[0.8, 0.1, 0.1], [0.05, 0.9, 0.05], [0.1, 0.1, 0.8]], np.float32)
    e = ensemble_probs(p_t, p_s)
    assert np.allclose(e.sum(1), 1) and np.allclose(e[[0, 2]], p_t[[0, 2]])  # agreement: unchanged
    assert e[1].max() < 0.7  # they disagree: below the 0.7 default, no label
    # through confident_labels, with the head's own probabilities from features
    im, y = toy_frames(np.random.default_rng(4), 30)
    f = toy_features(im)
    head = toy_head()
    p_head = softmax(head.logits(f))
    teacher = np.eye(3, dtype=np.float32)[y] * 0.9 + 0.1 / 3  # a teacher that is right, 93 % sure
    stamps = np.arange(100, 130)
    cfg = AdaptConfig(teacher_min_confidence=0.7)
    labels, info = confident_labels(teacher, TOY_CLASSES, head, cfg, f)
    labels = as_dict(stamps, labels)
    assert info['ensemble'] and info['candidates'] == 30 and info['kept'] == len(labels)
    want = ensemble_probs(teacher, p_head)
    assert labels == {int(s): TOY_CLASSES[int(np.argmax(w))] for s, w in zip(stamps, want) if w.max() >= 0.7}
    # classes that differ, or no features: the teacher alone, and the reason
    only, info2 = confident_labels(teacher, ('x', 'y', 'z'), head, cfg, f)
    only = as_dict(stamps, only)
    assert not info2['ensemble'] and 'differ' in info2['ensemble_note']
    assert set(only.values()) <= {'x', 'y', 'z'}
    only, info3 = confident_labels(teacher, TOY_CLASSES, head, cfg, None)
    only = as_dict(stamps, only)
    assert not info3['ensemble'] and len(only) == 30
    off, info4 = confident_labels(teacher, TOY_CLASSES, head,
                                  AdaptConfig(teacher_student_ensemble=False, teacher_min_confidence=0.7), f)
    off = as_dict(stamps, off)
    assert not info4['ensemble'] and off == {int(s): TOY_CLASSES[c] for s, c in zip(stamps, y)}


def test_non_redundant_thins_runs_of_one_class_not_varied_streams():
    """EATA's filter: in runs of one class (robot video) most frames repeat what the running mean already
    says and are dropped; a varied stream keeps (nearly) everything; 1.0 is off."""
    from edge_tl_ros.adapt.labels import non_redundant

    rng = np.random.default_rng(0)
    n_cls = 20

    def probs_of(classes):
        p = rng.dirichlet(np.full(n_cls, 0.05), len(classes)) * 0.1
        p[np.arange(len(classes)), classes] += 0.9
        return p / p.sum(1, keepdims=True)

    runs = np.repeat(rng.permutation(n_cls)[:8], 30)  # 8 signs, 30 frames each
    p_runs = probs_of(runs)
    keep = non_redundant(p_runs, np.ones(len(runs), bool), 0.5)
    starts = np.arange(0, len(runs), 30)
    assert keep[starts].all()  # the first frame of every new sign is kept
    per_run = keep.reshape(8, 30).sum(1)
    assert per_run.max() <= 6 and keep.sum() < 0.2 * len(runs), per_run
    assert non_redundant(p_runs, np.ones(len(runs), bool), 1.0).all()
    varied = rng.permutation(np.tile(np.arange(n_cls), 12))
    assert non_redundant(probs_of(varied), np.ones(len(varied), bool), 0.5).mean() > 0.8
    # frames already rejected (not confident) stay rejected and do not move the running mean
    mask = np.zeros(len(runs), bool)
    mask[::2] = True
    assert not (non_redundant(p_runs, mask, 0.5) & ~mask).any()


def test_confident_labels_apply_the_redundancy_filter():
    from edge_tl_ros.adapt.config import AdaptConfig as Cfg

    head = toy_head()
    p = np.tile(np.array([[0.96, 0.02, 0.02]], np.float32), (40, 1))
    p[20:] = [0.02, 0.02, 0.96]
    cfg = Cfg(teacher_student_ensemble=False, redundancy_max_cosine=0.9)
    names, info = confident_labels(p, TOY_CLASSES, head, cfg)
    kept = [i for i, n in enumerate(names) if n is not None]
    assert 0 in kept and 20 in kept and len(kept) <= 15  # the mean needs a few frames to move to a new sign
    assert info['confident'] == 40 and info['redundant'] == 40 - len(kept) and info['kept'] == len(kept)
    off, info_off = confident_labels(p, TOY_CLASSES, head, Cfg(teacher_student_ensemble=False))
    assert all(n is not None for n in off) and info_off['redundant'] == 0
    with pytest.raises(ValueError, match='labels.redundancy_max_cosine'):
        Cfg(redundancy_max_cosine=1.5).validate()
