"""Adapted backbones: AdaBN folded into the convolutions (ttn.adapted_backbone), versioned with heads in
the registry, and hot-swapped into a real perception node (rclpy, ONNX Runtime) without dropping a frame."""

import json
import os
import threading
import time

import numpy as np
import pytest

from edge_tl_ros import ttn
from edge_tl_ros.bundle import BundleError, HeadRegistry, load_bundle
from edge_tl_ros.engine import Engine
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_frames, toy_head


@pytest.fixture
def conv_bundle(tmp_path):
    """A toy bundle with a conv stem and the source norm stats of that stem."""
    root = make_toy_bundle(tmp_path / 'toy', conv=True)
    src, _ = toy_frames(np.random.default_rng(1), 200)
    ttn.add_to_bundle(root, src, threads=1)
    return load_bundle(root)


def _cast(frames):
    """A dim amber colour cast (street lights at night): per-channel gain and offset."""
    x = frames.astype(np.float32) * 0.5 + np.array([0.5, 0.2, 0.0], np.float32) * 255
    return np.clip(x, 0, 255).astype(np.uint8)


def _shifted(rng, n):
    x, y = toy_frames(rng, n)
    return _cast(x), y


def _adapted(bundle, frames):
    eng = Engine(bundle, 'feature_extractor')
    stats = ttn.load_norm_stats(bundle.path('norm_stats'))
    return ttn.adapted_backbone(bundle.files['backbone'], stats, eng.prepare_batch(frames))


def test_adapted_backbone_is_test_time_norm_frozen_into_the_weights(conv_bundle):
    """On the frames it was estimated on, the folded backbone equals batch test-time normalisation; frame
    by frame it recovers accuracy a colour shift took away, with no label."""
    rng = np.random.default_rng(2)
    x_t, y_t = _shifted(rng, 300)
    eng = Engine(conv_bundle, 'feature_extractor')
    stats = ttn.load_norm_stats(conv_bundle.path('norm_stats'))
    model = _adapted(conv_bundle, x_t[:200])
    adapted = Engine(conv_bundle, 'feature_extractor', backbone=model, backbone_version=1)
    tsess = ttn.TestTimeNormSession(conv_bundle.files['backbone'], stats)
    batch = tsess.features(eng.prepare_batch(x_t[:200]))
    np.testing.assert_allclose(adapted.features_batch(x_t[:200]), batch, rtol=1e-4, atol=1e-4)
    # single frames (the perception node's path), held-out frames of the same domain
    single = np.array([adapted.infer(im, 'rgb').probs.argmax() for im in x_t[200:]])
    before = float(np.mean(eng.predict_batch(x_t[200:]).argmax(1) == y_t[200:]))
    after = float(np.mean(single == y_t[200:]))
    assert before < 0.75 and after >= before + 0.25, (before, after)  # measured: 0.61 -> 1.0
    # the graph keeps the bundle's inputs and outputs; a conv without bias gets one
    import onnx
    m = onnx.load_from_string(model)
    assert [i.name for i in m.graph.input] == ['image'] and [o.name for o in m.graph.output] == ['features']
    with pytest.raises(ttn.TTNError, match='at least'):
        _adapted(conv_bundle, x_t[:3])


def test_registry_versions_a_backbone_with_its_head(conv_bundle, tmp_path):
    rng = np.random.default_rng(3)
    model = _adapted(conv_bundle, _shifted(rng, 100)[0])
    reg = HeadRegistry(conv_bundle, tmp_path / 'state', keep_versions=2)
    v1 = reg.add(toy_head(), metrics={'kind': 'backbone'}, backbone=model)
    meta = reg.index()['versions']['1']
    assert meta['backbone']['file'] == 'backbone_v1.onnx'
    assert (reg.dir / 'backbone_v1.onnx').read_bytes() == model
    head, backbone = reg.load(with_backbone=True)
    assert head.version == v1.version == 1 and backbone == model
    reg.add(toy_head(permute=(1, 2, 0)))  # v2: a head on the bundle backbone
    assert reg.load(with_backbone=True)[1] is None
    # rollback returns v1 as a pair
    head, backbone = reg.rollback(with_backbone=True)
    assert head.version == 1 and backbone == model
    # a damaged backbone makes the whole version unusable: load refuses, fallback skips to v0
    (reg.dir / 'backbone_v1.onnx').write_bytes(b'garbage')
    with pytest.raises(BundleError, match='sha256 mismatch'):
        reg.load(1, with_backbone=True)
    head, backbone, warn = reg.load_current_or_fallback(with_backbone=True)
    assert head.version == 0 and backbone is None and 'unusable' in warn
    (reg.dir / 'backbone_v1.onnx').write_bytes(model)
    # an index entry naming another file is corrupt
    idx = json.loads(reg.index_path.read_text())
    idx['versions']['1']['backbone']['file'] = '../../etc/passwd'
    reg.index_path.write_text(json.dumps(idx))
    with pytest.raises(BundleError, match='backbone entry'):
        reg.index()
    idx['versions']['1']['backbone']['file'] = 'backbone_v1.onnx'
    reg.index_path.write_text(json.dumps(idx))
    # retention removes a pruned version's backbone with its head; old stray backbones go too
    stray = reg.dir / 'backbone_v99.onnx'
    stray.write_bytes(model)
    os.utime(stray, (time.time() - 3600, time.time() - 3600))
    reg.add(toy_head(), backbone=model)  # v3 (v2 was dropped from accepted by the rollback)
    reg.add(toy_head())  # v4: keep_versions=2 prunes v1
    assert not (reg.dir / 'backbone_v1.onnx').exists() and not stray.exists()
    assert (reg.dir / 'backbone_v3.onnx').exists()
    # a backbone that does not fit the bundle is refused by the engine with a clear error
    with pytest.raises(BundleError, match='ONNX Runtime cannot load'):
        Engine(conv_bundle, 'feature_extractor', backbone=b'not onnx', backbone_version=5)
    with pytest.raises(Exception, match='full'):
        Engine(conv_bundle, 'full', backbone=model)


def test_perception_node_swaps_backbone_and_head_together_without_dropping_a_frame(
        ros_context, conv_bundle, tmp_path):
    rclpy = pytest.importorskip('rclpy')
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger
    from vision_msgs.msg import Classification

    from edge_tl_ros.imaging import image_fields
    from edge_tl_ros.nodes.perception_node import PerceptionNode

    rng = np.random.default_rng(4)
    x_t, _ = _shifted(rng, 200)
    model = _adapted(conv_bundle, x_t[:150])
    probe = x_t[150]
    ref_new = Engine(conv_bundle, 'feature_extractor', backbone=model, backbone_version=1).infer(probe, 'rgb')
    ref_old = Engine(conv_bundle, 'feature_extractor').infer(probe, 'rgb')
    assert not np.allclose(ref_new.probs, ref_old.probs, atol=1e-3)
    state = tmp_path / 'state'
    node = PerceptionNode(context=ros_context, parameter_overrides=[
        Parameter('model_bundle', value=str(conv_bundle.root)), Parameter('state_dir', value=str(state)),
        Parameter('qos_reliability', value='reliable'), Parameter('qos_depth', value=50),
        Parameter('top_k', value=3)])
    io = rclpy.create_node('io', context=ros_context)
    got = []
    io.create_subscription(Classification, '/perception/classification', got.append, 500)
    pub = io.create_publisher(Image, 'image', QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE))
    reload_cli = io.create_client(Trigger, '/perception/reload_head')
    rollback_cli = io.create_client(Trigger, '/perception/rollback')
    ex = MultiThreadedExecutor(num_threads=4, context=ros_context)
    ex.add_node(node)
    ex.add_node(io)
    threading.Thread(target=ex.spin, daemon=True).start()

    def call(cli):
        assert cli.wait_for_service(timeout_sec=5)
        fut = cli.call_async(Trigger.Request())
        deadline = time.monotonic() + 10
        while not fut.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        return fut.result()

    def scores(msg):
        return np.array([dict((r.class_id, r.score) for r in msg.results)[c] for c in TOY_CLASSES])

    def classify(stamp):
        msg = Image(**image_fields(probe, 'rgb8'))
        msg.header.stamp.sec = stamp
        pub.publish(msg)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            hit = [m for m in got if m.header.stamp.sec == stamp]
            if hit:
                return scores(hit[0])
            time.sleep(0.01)
        raise AssertionError(f'no classification for stamp {stamp}')

    try:
        deadline = time.monotonic() + 10
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        np.testing.assert_allclose(classify(1), ref_old.probs, atol=1e-5)
        HeadRegistry(conv_bundle, state).add(toy_head(), metrics={}, backbone=model)
        # frames stream in at a camera's 30 Hz while the node builds the new session and swaps
        stop = threading.Event()
        sent = []

        def stream():
            s = 1000
            while not stop.is_set():
                msg = Image(**image_fields(probe, 'rgb8'))
                msg.header.stamp.sec = s
                pub.publish(msg)
                sent.append(s)
                s += 1
                time.sleep(1 / 30)
        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)
        res = call(reload_cli)
        time.sleep(0.5)
        stop.set()
        t.join()
        assert res.success and 'adapted backbone' in res.message, res.message
        assert node.head_version == 1 and node.backbone_version == 1
        deadline = time.monotonic() + 5
        while len({m.header.stamp.sec for m in got if m.header.stamp.sec >= 1000}) < len(sent) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        streamed = [m for m in got if m.header.stamp.sec >= 1000]
        assert node.dropped == 0 and node.rejected == 0
        assert len({m.header.stamp.sec for m in streamed}) == len(sent), 'a frame was dropped during the swap'
        # every streamed frame came from exactly one of the two models, old ones first
        kinds = ['old' if np.allclose(scores(m), ref_old.probs, atol=1e-5) else
                 'new' if np.allclose(scores(m), ref_new.probs, atol=1e-5) else 'mixed'
                 for m in sorted(streamed, key=lambda m: m.header.stamp.sec)]
        assert 'mixed' not in kinds and kinds[0] == 'old' and kinds[-1] == 'new'
        assert kinds == sorted(kinds, key=lambda k: k == 'new')
        np.testing.assert_allclose(classify(5000), ref_new.probs, atol=1e-5)
        # rollback brings back the bundle backbone with head v0
        res = call(rollback_cli)
        assert res.success and node.head_version == 0 and node.backbone_version is None, res.message
        np.testing.assert_allclose(classify(5001), ref_old.probs, atol=1e-5)
    finally:
        ex.shutdown(timeout_sec=2)
        node.destroy_node()
        io.destroy_node()
    # a restarted node starts from the registry's current version, backbone included
    HeadRegistry(conv_bundle, state).activate(1)
    node = PerceptionNode(context=ros_context, parameter_overrides=[
        Parameter('model_bundle', value=str(conv_bundle.root)), Parameter('state_dir', value=str(state))])
    try:
        assert node.head_version == 1 and node.backbone_version == 1
        np.testing.assert_allclose(node.engine.infer(probe, 'rgb').probs, ref_new.probs, atol=1e-6)
    finally:
        node.destroy_node()


def test_backbone_round_proposes_and_gates_an_adapted_backbone(conv_bundle):
    from edge_tl_ros.adapt import AdaptConfig, backbone_round

    rng = np.random.default_rng(6)
    x, y = _shifted(rng, 150)
    names = [TOY_CLASSES[i] for i in y]
    r = backbone_round(conv_bundle, x, names, ['teacher'] * len(x), conv_bundle.head, None, AdaptConfig())
    assert r.accepted and r.backbone is not None and r.metrics['kind'] == 'backbone', r.reason
    assert r.metrics['holdout_acc_old'] < 0.8 and r.metrics['holdout_acc_new'] >= 0.95, r.metrics
    assert r.metrics['anchor_acc_new'] >= r.metrics['anchor_acc_old'] - 0.05  # source images still right
    xt, yt = _shifted(rng, 100)
    eng = Engine(conv_bundle, 'feature_extractor', head=r.head, backbone=r.backbone, backbone_version=1)
    assert np.mean(eng.predict_batch(xt).argmax(1) == yt) >= 0.95  # frames it never saw
    # the gate: a pair that does not beat the deployed one by the margin is refused (with the pair
    # returned for inspection), as a head is
    strict = backbone_round(conv_bundle, x, names, ['teacher'] * len(x), conv_bundle.head, None,
                            AdaptConfig(margin=0.5))
    assert not strict.accepted and 'does not improve by margin 0.500' in strict.reason
    assert strict.backbone is not None and strict.head is not None
    # self labels never validate; too few labels, new classes, or no anchor images: no candidate
    few = backbone_round(conv_bundle, x[:10], names[:10], ['topic'] * 10, conv_bundle.head, None,
                         AdaptConfig())
    assert not few.accepted and 'not enough' in few.reason
    plain = load_bundle(make_toy_bundle(conv_bundle.root.parent / 'plain', conv=True, with_anchor=False))
    assert backbone_round(plain, x, names, ['topic'] * len(x), plain.head, None, AdaptConfig()) is None


def test_anchor_images_must_fit_the_bundle(tmp_path):
    from edge_tl_ros.atomic import atomic_write_bytes, load_npz, npz_bytes
    from edge_tl_ros.bundle import read_manifest, write_manifest

    root = make_toy_bundle(tmp_path / 'toy', conv=True)
    assert load_bundle(root).anchor_images.shape == (60, 16, 16, 3)  # the toy anchor carries its images
    z = load_npz(root / 'anchor.npz')
    for images, why in ((z['images'][:, :8], r'\[60, 16, 16, 3\] \(the input size\)'),
                        (z['images'].astype(np.float32), 'uint8')):
        atomic_write_bytes(root / 'anchor.npz', npz_bytes(features=z['features'], labels=z['labels'],
                                                          images=images))
        write_manifest(root, read_manifest(root))
        with pytest.raises(BundleError, match=why):
            load_bundle(root)


def test_choose_takes_the_accepted_candidate_with_the_larger_holdout_gain():
    from edge_tl_ros.adapt import RoundResult, choose

    def res(accepted, old, new, kind=None):
        m = {'holdout_acc_old': old, 'holdout_acc_new': new}
        if kind:
            m['kind'] = kind
        return RoundResult(accepted, 'r', None, m, backbone=b'x' if kind else None)

    assert choose(res(True, 0.5, 0.6), res(True, 0.5, 0.9, 'backbone')).metrics['kind'] == 'backbone'
    assert choose(res(True, 0.5, 0.9), res(True, 0.5, 0.6, 'backbone')).metrics['kind'] == 'head'
    picked = choose(res(False, 0.5, 0.5), res(True, 0.5, 0.6, 'backbone'))
    assert picked.accepted and picked.backbone == b'x'
    picked = choose(res(True, 0.5, 0.6), res(False, 0.5, 0.9, 'backbone'))
    assert picked.backbone is None and picked.metrics['other_candidate']['accepted'] is False
    assert choose(res(False, 0.5, 0.5), None).metrics == {'holdout_acc_old': 0.5, 'holdout_acc_new': 0.5}


def test_rounds_on_top_of_an_adapted_backbone(conv_bundle, tmp_path):
    """The store's features come from the bundle backbone: on a version that runs an adapted backbone the
    head-only candidate would gate against the wrong baseline, so only the backbone candidate runs (both
    pairs evaluated from the stored crops); with it switched off the round fails and says why."""
    from edge_tl_ros.adapt import AdaptConfig, run_round_in_subprocess
    from edge_tl_ros.store import FrameStore

    eng = Engine(conv_bundle, 'feature_extractor')
    st = FrameStore(tmp_path / 'store', crop_size=(16, 16))
    im, y = _shifted(np.random.default_rng(5), 90)
    for i in range(len(im)):
        p = eng.infer(im[i], 'rgb')
        st.add(10_000 + i, im[i], p.features, p.probs, TOY_CLASSES[y[i]], 'topic')
    state = tmp_path / 'state'
    reg = HeadRegistry(conv_bundle, state)
    cfg = AdaptConfig(anchor_tolerance=0.1)
    r = run_round_in_subprocess(conv_bundle.root, state, st.root, cfg, threads=1)
    assert r.accepted and not r.failed, (r.reason, r.metrics)
    assert 'other_candidate' in r.metrics  # both candidates ran, the better one is returned
    reg.add(r.head, r.metrics, backbone=r.backbone)
    # force a backbone version, then a round on top of it
    reg.add(toy_head(), backbone=_adapted(conv_bundle, im))
    r2 = run_round_in_subprocess(conv_bundle.root, state, st.root, cfg, threads=1)
    assert not r2.failed and r2.metrics['kind'] == 'backbone', (r2.reason, r2.metrics)
    assert r2.backbone is not None
    assert 'other_candidate' not in r2.metrics  # the head-only candidate did not run
    off = run_round_in_subprocess(conv_bundle.root, state, st.root, AdaptConfig(adapt_backbone=False),
                                  threads=1)
    assert off.failed and 'adapted backbone' in (off.reason + str(off.metrics.get('error', '')))


def test_adaptation_node_never_scores_bundle_features_with_a_head_for_an_adapted_backbone(
        ros_context, conv_bundle, tmp_path):
    """The adaptation node stores bundle-backbone features (what rounds train on). When the registry's
    version runs an adapted backbone, its head must not score those features (selection, self labels):
    the node keeps the bundle head for that, reports the version it follows, and takes the next
    bundle-backbone version's head again."""
    from rclpy.parameter import Parameter

    from edge_tl_ros.nodes.adaptation_node import AdaptationNode

    state = tmp_path / 'state'
    reg = HeadRegistry(conv_bundle, state)
    adapted_head = toy_head(permute=(1, 2, 0), version=0)
    reg.add(adapted_head, backbone=_adapted(conv_bundle, _shifted(np.random.default_rng(8), 60)[0]))
    node = AdaptationNode(context=ros_context, parameter_overrides=[
        Parameter('model_bundle', value=str(conv_bundle.root)), Parameter('state_dir', value=str(state)),
        Parameter('teacher_bundle', value=''), Parameter('advanced.use_perception_features', value=True)])
    try:
        assert node.status()['head_version'] == 1  # the version it follows
        np.testing.assert_array_equal(node.engine.head.weight, conv_bundle.head.weight)
        # perception's ~/features come from the adapted backbone now: not stored as bundle features
        assert not node.collector.use_perception_features
        plain = reg.add(toy_head(permute=(2, 0, 1)))  # v2 on the bundle backbone: its head is used
        node._follow_registry()
        assert node.status()['head_version'] == 2 and node.collector.use_perception_features
        np.testing.assert_array_equal(node.engine.head.weight, plain.weight)
        reg.activate(1)  # back to the adapted version (a rollback elsewhere): bundle head again
        node._follow_registry()
        assert node.status()['head_version'] == 1 and not node.collector.use_perception_features
        np.testing.assert_array_equal(node.engine.head.weight, conv_bundle.head.weight)
    finally:
        node.destroy_node()
