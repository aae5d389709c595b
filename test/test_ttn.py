"""ttn: test-time normalisation of a backbone's conv outputs (real ONNX graphs, real ORT sessions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_tl_ros.adapt import LabelModel
from edge_tl_ros.adapt.labels import frames_to_label
from edge_tl_ros.bundle import BundleError, Head, load_bundle, write_manifest
from edge_tl_ros.store import FrameStore
from edge_tl_ros.ttn import (
    MIN_BATCH,
    TestTimeNormSession,
    TTNError,
    add_to_bundle,
    balanced_batches,
    compute_norm_stats,
    load_norm_stats,
    save_norm_stats,
    ttn_model,
)

SIZE = 12
CLASSES = ('a', 'b', 'c', 'd')


def conv_net(path: Path, opset: int = 17, seed: int = 0, width: int = 6) -> Path:
    """Conv3x3 (valid) -> ReLU -> Conv1x1 -> ReLU -> global pool -> features [N,5]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (width, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.5, width).astype(np.float32)
    w2 = rng.normal(0, 0.5, (5, width, 1, 1)).astype(np.float32)
    b2 = rng.normal(0, 0.5, 5).astype(np.float32)
    nodes = [
        helper.make_node('Conv', ['image', 'w1', 'b1'], ['c1'], kernel_shape=[3, 3]),
        helper.make_node('Relu', ['c1'], ['r1']),
        helper.make_node('Conv', ['r1', 'w2', 'b2'], ['c2'], kernel_shape=[1, 1]),
        helper.make_node('Relu', ['c2'], ['r2']),
        helper.make_node('GlobalAveragePool', ['r2'], ['pooled']),
        helper.make_node('Flatten', ['pooled'], ['features'], axis=1),
    ]
    graph = helper.make_graph(
        nodes, 'tiny_conv',
        [helper.make_tensor_value_info('image', TensorProto.FLOAT, ['N', 3, SIZE, SIZE])],
        [helper.make_tensor_value_info('features', TensorProto.FLOAT, ['N', 5])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, 'w1'), (b1, 'b1'), (w2, 'w2'), (b2, 'b2'))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def plain_features(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return sess.run(['features'], {'image': x})[0]


def source_batches(seed: int, n: int = 256, batch: int = 64):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (batch, 3, SIZE, SIZE)).astype(np.float32) for _ in range(n // batch)]


@pytest.mark.parametrize('opset', [17, 18])  # ReduceMean takes axes as an attribute before 18, an input after
def test_renormalised_backbone_undoes_an_input_contrast_and_brightness_shift(tmp_path, opset):
    net = conv_net(tmp_path / 'net.onnx', opset=opset)
    stats = compute_norm_stats(net, source_batches(0))
    assert list(stats['names']) == ['c1', 'c2'] and list(stats['sizes']) == [6, 5] and stats['count'] == 256
    sess = TestTimeNormSession(net, stats)
    x = source_batches(1, 64)[0]
    shifted = 0.35 * x - 1.2  # a darker, low-contrast domain: every activation statistic moves
    plain, plain_shifted = plain_features(net, x), plain_features(net, shifted)
    ttn, ttn_shifted = sess.features(x), sess.features(shifted)
    scale = float(np.abs(plain).mean())
    # the first conv sees a per-channel affine copy of its source activations: re-normalising by batch
    # statistics removes the shift exactly, so everything after it sees the same tensors
    assert np.abs(ttn_shifted - ttn).max() < 1e-3 * scale
    assert np.abs(plain_shifted - plain).mean() > 0.2 * scale
    # on a batch from the source distribution the renormalised network computes (nearly) the plain one
    assert np.abs(ttn - plain).mean() < 0.08 * scale


def test_source_moments_are_those_of_the_conv_outputs(tmp_path):
    net = conv_net(tmp_path / 'net.onnx')
    batches = source_batches(2, 128)
    stats = compute_norm_stats(net, batches)
    m = onnx.load(str(net))
    w1 = numpy_helper.to_array(m.graph.initializer[0])
    b1 = numpy_helper.to_array(m.graph.initializer[1])
    # inputs are N(0,1) iid, the conv is valid: mean = bias, std = |w| per output channel
    assert np.allclose(stats['mean'][:6], b1, atol=0.1)
    assert np.allclose(stats['std'][:6], np.sqrt((w1.reshape(6, -1) ** 2).sum(1)), rtol=0.05)


def test_stats_of_another_graph_small_batches_and_bad_files_are_refused(tmp_path):
    net = conv_net(tmp_path / 'net.onnx')
    stats = compute_norm_stats(net, source_batches(0, 64))
    other = tmp_path / 'other.onnx'
    helper_model = onnx.load(str(net))
    helper_model.graph.node[0].output[0] = 'renamed'
    helper_model.graph.node[1].input[0] = 'renamed'
    onnx.save(helper_model, str(other))
    with pytest.raises(TTNError, match='different graph'):
        ttn_model(other, stats)
    sess = TestTimeNormSession(net, stats)
    with pytest.raises(TTNError, match=f'>= {MIN_BATCH}'):
        sess.features(np.zeros((MIN_BATCH - 1, 3, SIZE, SIZE), np.float32))
    p = save_norm_stats(tmp_path / 'ns.npz', stats)
    back = load_norm_stats(p)
    assert np.array_equal(back['mean'], stats['mean']) and list(back['names']) == ['c1', 'c2']
    bad = dict(stats, sizes=np.array([6, 6]))
    with pytest.raises(TTNError, match='do not fit'):
        load_norm_stats(save_norm_stats(tmp_path / 'bad.npz', bad))
    (tmp_path / 'trunc.npz').write_bytes(p.read_bytes()[:100])
    with pytest.raises(TTNError):
        load_norm_stats(tmp_path / 'trunc.npz')


def test_balanced_batches_cover_every_index_once_without_small_remainders():
    for n, bs in ((1, 64), (63, 64), (64, 64), (200, 64), (1000, 64)):
        batches = balanced_batches(n, bs, seed=3)
        allidx = np.concatenate(batches)
        assert sorted(allidx.tolist()) == list(range(n))
        if n >= bs:
            assert all(bs <= len(b) <= 2 * bs - 1 for b in batches)
        else:
            assert len(batches) == 1
    assert balanced_batches(0, 64) == []
    # shuffled: a batch is not one contiguous run of frames (a robot sees one sign for many frames)
    assert any(np.any(np.diff(b) > 1) for b in balanced_batches(200, 64))


def even_images(seed: int, n: int) -> np.ndarray:
    """Frames with a random colour each plus texture; all values even, so ``// 2`` halves them exactly."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(15, 100, (n, 1, 1, 3))
    texture = rng.integers(0, 28, (n, SIZE, SIZE, 3))
    return ((colour + texture) * 2).astype(np.uint8)


def teacher_bundle(root: Path) -> Path:
    """A tiny conv teacher whose head splits the source frames into 4 roughly balanced classes."""
    root.mkdir(parents=True)
    conv_net(root / 'backbone.onnx', seed=4)
    x = (even_images(9, 400).astype(np.float32) - 128.0) / 64.0
    f = plain_features(root / 'backbone.onnx', np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    w = np.random.default_rng(5).normal(0, 1, (4, 5)) / (f.std(0) + 1e-6)
    Head(w.astype(np.float32), (-(w @ f.mean(0))).astype(np.float32), CLASSES).save(root / 'head.npz')
    write_manifest(root, {
        'format_version': 1, 'name': 'tiny_teacher', 'task': 'classification', 'architecture': 'tiny_conv',
        'class_names': list(CLASSES),
        'input': {'height': SIZE, 'width': SIZE, 'color_order': 'rgb', 'mean': [128.0] * 3,
                  'std': [64.0] * 3},
        'feature_size': 5, 'files': {'backbone': 'backbone.onnx', 'head': 'head.npz'}})
    return root


def test_bundle_norm_stats_and_teacher_labels_that_survive_a_dark_domain(tmp_path):
    root = teacher_bundle(tmp_path / 'teacher')
    plain = LabelModel(root, test_time_norm=True)
    assert plain.mode == 'plain' and 'norm-stats' in plain.note  # no stats yet: says how to add them
    summary = add_to_bundle(root, even_images(0, 300), threads=1, source='unit test')
    assert summary['images'] == 300 and summary['conv_outputs'] == 2
    b = load_bundle(root)  # norm_stats.npz is hashed in the manifest like every other file
    assert b.path('norm_stats').name == 'norm_stats.npz' and b.manifest['norm_stats']['source'] == 'unit test'
    lab = LabelModel(root, test_time_norm=True, ttn_batch_size=32)
    assert lab.mode == 'test_time_norm' and lab.note is None
    img = even_images(1, 96)
    dark = img // 2  # exactly half as bright: an affine input shift after normalisation
    p_img, p_dark = lab.probs(img), lab.probs(dark)
    assert np.abs(p_dark - p_img).max() < 1e-3
    q_img, q_dark = plain.probs(img), plain.probs(dark)
    assert len(np.unique(np.argmax(q_img, 1))) >= 3  # the teacher tells the source frames apart
    # the plain teacher gets the dark frames wrong (its own bright-frame answers as reference)
    assert np.mean(np.argmax(q_img, 1) != np.argmax(q_dark, 1)) > 0.3
    assert np.mean(np.argmax(p_dark, 1) == np.argmax(q_img, 1)) > 0.9  # test-time norm: still right
    # a manifest whose norm_stats file was swapped is refused at load like any other file
    save_norm_stats(root / 'norm_stats.npz', dict(load_norm_stats(root / 'norm_stats.npz'),
                                                  mean=np.zeros(11, np.float32)))
    with pytest.raises(BundleError, match='sha256'):
        load_bundle(root)


def store_probs(lab, store):
    """The round's batching (frames_to_label): unlabelled entries, padded with other stored crops."""
    stamps, imgs, context = frames_to_label(store, store.entries(), min_batch=lab.ttn_batch_size)
    return stamps, lab.probs(imgs, context)


def test_frames_to_label_pads_small_sets_with_stored_context_and_falls_back_on_tiny_stores(tmp_path):
    root = teacher_bundle(tmp_path / 'teacher')
    add_to_bundle(root, even_images(0, 200), threads=1)
    lab = LabelModel(root, test_time_norm=True, ttn_batch_size=32)
    st = FrameStore(tmp_path / 'store', crop_size=(SIZE, SIZE))
    imgs = even_images(2, 60)
    feats, probs = np.zeros(5, np.float32), np.full(4, 0.25, np.float32)
    for i in range(50):  # already labelled: context only
        st.add(1000 + i, imgs[i], feats, probs, CLASSES[i % 4], 'topic')
    for i in range(50, 60):  # 10 frames to label, fewer than MIN_BATCH
        st.add(1000 + i, imgs[i], feats, probs)
    stamps, p = store_probs(lab, st)  # 10 frames + 22 stored crops as context: one normalised batch
    assert stamps.tolist() == list(range(1050, 1060)) and p.shape == (10, 4)
    alone = lab.probs(imgs[50:60], context_rgb=st.crops(list(range(1049, 1049 - 22, -1)))[0])
    assert np.allclose(p, alone, atol=1e-5)
    tiny = FrameStore(tmp_path / 'tiny', crop_size=(SIZE, SIZE))
    for i in range(5):
        tiny.add(2000 + i, imgs[i], feats, probs)
    stamps, p = store_probs(lab, tiny)  # 5 frames in all: too few to normalise, plain teacher probabilities
    assert stamps.tolist() == list(range(2000, 2005))
    assert np.allclose(p, LabelModel(root).probs(tiny.crops(stamps)[0]), atol=1e-6)


def test_teacher_labeller_with_test_time_norm_needs_no_torch(tmp_path, python_without):
    """The adaptation round runs on the robot: test-time normalisation must work without torch."""
    root = teacher_bundle(tmp_path / 'teacher')
    add_to_bundle(root, even_images(0, 64), threads=1)
    out = python_without(('torch', 'torchvision'), (
        'import numpy as np\n'
        'from edge_tl_ros.adapt import LabelModel\n'
        f'lab = LabelModel({str(root)!r}, test_time_norm=True, ttn_batch_size=16)\n'
        'img = np.full((20, 12, 12, 3), 100, np.uint8); img[:, :6] = 200\n'
        'print(lab.mode, lab.probs(img).shape)\n'))
    assert out.split() == ['test_time_norm', '(20,', '4)']
