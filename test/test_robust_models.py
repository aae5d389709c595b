"""The robust-model recipe: generic augmentation, GTSDB-layout scenes and crops, outlier exposure,
temperature scaling and the reject threshold folded into a real bundle (ONNX Runtime, real files).

All data is generated here; each test takes seconds of CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip('cv2')

from edge_tl_ros import calibration as C  # noqa: E402
from edge_tl_ros import gtsdb  # noqa: E402
from edge_tl_ros.bundle import load_bundle  # noqa: E402
from edge_tl_ros.data import Split  # noqa: E402
from edge_tl_ros.engine import Engine  # noqa: E402
from edge_tl_ros.toy import TOY_CLASSES, make_toy_bundle, toy_frames  # noqa: E402


# -- augmentation ----------------------------------------------------------------------------------
def test_robust_augment_changes_images_deterministically_and_leaves_the_input():
    from edge_tl_ros.training.augment import OPS, RESEMBLES, RobustAugment

    imgs, _ = toy_frames(np.random.default_rng(0), 64, size=32)
    before = imgs.copy()
    aug = RobustAugment(p=1.0, erase_p=0.5)
    a = aug(imgs, np.random.default_rng(1))
    b = aug(imgs, np.random.default_rng(1))
    assert np.array_equal(imgs, before), 'the input batch must not be modified'
    assert a.shape == imgs.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    changed = np.abs(a.astype(int) - imgs.astype(int)).reshape(64, -1).max(1) > 0
    assert changed.mean() > 0.9
    # each operation alone changes an image and keeps shape/dtype
    for op in OPS:
        one = RobustAugment(ops=(op,), n_ops=1, p=1.0, erase_p=0.0)(imgs[:8], np.random.default_rng(2))
        assert one.shape == (8, 32, 32, 3) and one.dtype == np.uint8
        assert np.abs(one.astype(int) - imgs[:8].astype(int)).max() > 0, op
    # leave-one-family-out drops exactly the resembling operations
    for fam, ops in RESEMBLES.items():
        w = aug.without(fam)
        assert not set(w.ops) & set(ops) and set(w.ops) | set(ops) >= set(OPS) - {'erase'}
    assert aug.without('rain').erase_p == 0.0
    with pytest.raises(ValueError, match='unknown augmentation ops'):
        RobustAugment(ops=('sepia',))
    with pytest.raises(ValueError, match='unknown shift family'):
        aug.without('snow')
    off = RobustAugment(enabled=False)
    assert off(imgs, np.random.default_rng(0)) is imgs


# -- GTSDB layout ----------------------------------------------------------------------------------
def _scenes(root, n=4, bad_line=None):
    (root / 'images').mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.integers(0, 80, (120, 200, 3), np.uint8)
        cv2.rectangle(img, (40, 30), (70, 60), (0, 0, 255), -1)  # one red "sign" per scene (BGR)
        cv2.imwrite(str(root / 'images' / f'{i:05d}.jpg'), img)
        lines.append(f'{i:05d}.jpg;40;30;71;61;{i % 3}')
    if bad_line:
        lines.append(bad_line)
    (root / 'gt.txt').write_text('\n'.join(lines) + '\n')
    return root


def test_gtsdb_scenes_sign_and_background_crops(tmp_path):
    root = _scenes(tmp_path / 'g')
    scenes = gtsdb.load_scenes(root)
    assert len(scenes) == 4 and all(len(s.boxes) == 1 for s in scenes)
    assert [len(s) for s in (gtsdb.load_scenes(root, 'train'), gtsdb.load_scenes(root, 'test'))] == [4, 0]
    x, y = gtsdb.sign_crops(root, 'all', size=24)
    assert x.shape == (4, 24, 24, 3) and y.tolist() == [0, 1, 2, 0]
    assert x[:, 12, 12, 0].min() > 200  # the red box centre, RGB
    bg = gtsdb.background_crops(root, 'all', per_scene=20, size=16, min_side=8, max_side=40, seed=3)
    assert bg.shape == (80, 16, 16, 3)
    assert (bg[..., 0].astype(int) - bg[..., 2]).max() < 150, 'a background crop touched the sign'
    assert np.array_equal(bg, gtsdb.background_crops(root, 'all', per_scene=20, size=16, min_side=8,
                                                     max_side=40, seed=3))


def test_gtsdb_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(gtsdb.SceneError, match='not a GTSDB-layout folder'):
        gtsdb.load_scenes(tmp_path)
    root = _scenes(tmp_path / 'g', bad_line='00001.jpg;1;2;three;4;5')
    with pytest.raises(gtsdb.SceneError, match=r'gt.txt:5: expected file;left'):
        gtsdb.load_scenes(root)


# -- calibration -------------------------------------------------------------------------------------
def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    rng = np.random.default_rng(0)
    n, c = 4000, 10
    true = rng.normal(0, 2.0, (n, c))
    labels = np.array([rng.choice(c, p=p) for p in C.softmax(true)])
    over = true * 3.0  # an over-confident model: logits 3x too large
    t = C.fit_temperature(over, labels)
    assert 2.6 < t < 3.4, t
    assert C.ece(C.softmax(over, t), labels) < 0.5 * C.ece(C.softmax(over), labels)
    assert C.nll(over, labels, t) < C.nll(over, labels)
    with pytest.raises(ValueError):
        C.fit_temperature(over[:10], labels[:5])


def test_reject_threshold_keeps_the_requested_fraction():
    probs = C.softmax(np.random.default_rng(1).normal(0, 3, (1000, 5)))
    thr = C.reject_threshold(probs, keep=0.9)
    assert abs((probs.max(1) >= thr).mean() - 0.9) < 0.01
    rep = C.reject_report(probs, probs.argmax(1), probs[:100] * 0 + 0.2, thr)
    assert rep['background_false_accept_rate'] == 0.0 and rep['accepted_sign_accuracy'] == 1.0


def test_calibrate_bundle_folds_the_temperature_into_head_and_full_onnx(tmp_path):
    pytest.importorskip('onnx')
    from edge_tl_ros.training.calibrate import bundle_logits, calibrate_bundle

    root = make_toy_bundle(tmp_path / 'toy', size=16)
    rng = np.random.default_rng(0)
    x, y = toy_frames(rng, 300, size=16)
    val, test = Split(x[:150], y[:150], TOY_CLASSES), Split(x[150:], y[150:], TOY_CLASSES)
    grey = np.full((40, 16, 16, 3), 128, np.uint8) + rng.integers(0, 20, (40, 16, 16, 3)).astype(np.uint8)
    before = bundle_logits(root, test.images)
    t = C.fit_temperature(bundle_logits(root, val.images), val.labels)
    out = calibrate_bundle(root, val, test, grey, keep=0.95, background_desc='grey', log=lambda *_: None)
    b = load_bundle(root)  # hashes rewritten
    assert b.manifest['calibration']['temperature'] == pytest.approx(t, rel=1e-4)
    assert b.manifest['reject']['min_score'] == out['reject']['min_score'] > 0
    after = bundle_logits(root, test.images)
    assert np.allclose(after, before / t, atol=1e-4)
    # full.onnx gives the same calibrated probabilities as backbone + head
    full, feat = Engine(b, 'full'), Engine(b, 'feature_extractor')
    for img in test.images[:5]:
        assert np.allclose(full.infer(img, 'rgb').probs, feat.infer(img, 'rgb').probs, atol=1e-5)
    rep = out['reject']['test']
    assert rep['background_n'] == 40 and 0.0 <= rep['background_false_accept_rate'] <= 1.0
    # calibrating again composes: the new fit is ~1, the recorded temperature stays ~t
    again = calibrate_bundle(root, val, None, None, log=lambda *_: None)
    assert again['calibration']['temperature'] == pytest.approx(t, rel=0.02)


# -- outlier exposure in the training loop ------------------------------------------------------------
def test_outlier_exposure_lowers_the_score_of_background():
    torch = pytest.importorskip('torch')
    from edge_tl_ros.training.loop import FitConfig, fit, predict_logits
    from edge_tl_ros.training.models import build_model

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    x, y = toy_frames(rng, 240, size=16)
    train = Split(x, y, TOY_CLASSES)
    bg = rng.integers(0, 256, (200, 16, 16, 3), np.uint8)  # noise: no class

    def bg_conf(weight):
        torch.manual_seed(0)
        m = build_model('seed_cnn', 3, 16)
        cfg = FitConfig(epochs=6, batch_size=32, lr=5e-3, input_size=16, outlier_weight=weight)
        fit(m, train, None, cfg, log=lambda *_: None, progress=False, background=bg if weight else None)
        probs = C.softmax(predict_logits(m, bg, 16))
        acc = (predict_logits(m, x, 16).argmax(1) == y).mean()
        return probs.max(1).mean(), acc

    plain, acc_plain = bg_conf(0.0)
    oe, acc_oe = bg_conf(1.0)
    assert oe < plain - 0.1 and oe < 0.6, (oe, plain)
    assert acc_oe > 0.9 and acc_plain > 0.9
    with pytest.raises(ValueError, match='needs background images'):
        fit(build_model('seed_cnn', 3, 16), train, None,
            FitConfig(epochs=1, input_size=16, outlier_weight=1.0), log=lambda *_: None, progress=False)


def test_distill_with_outlier_exposure_uses_background_crops_of_the_train_scenes(tmp_path, capsys):
    """``edge-tl distill --outlier-weight`` reads GTSDB-layout background crops and records them."""
    pytest.importorskip('torch')
    from edge_tl_ros.cli import main
    from edge_tl_ros.training import datasets as D

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    x, y = toy_frames(rng, len(labels), size=16, labels=labels)
    xt, yt = toy_frames(rng, 30, size=16)
    npz = tmp_path / 'toy.npz'
    D.save_npz(D.Dataset(Split(x, y, TOY_CLASSES), Split(xt, yt, TOY_CLASSES), 'gtsrb-npz', str(npz)), npz)
    scenes = _scenes(tmp_path / 'g')
    args = ['distill', '--data', str(npz), '--image-size', '16', '--student-epochs', '1', '--alpha', '0',
            '--student-batch-size', '32', '--no-int8', '--no-progress', '--threads', '1',
            '--work', str(tmp_path / 'w'), '--out', str(tmp_path / 's')]
    # no GTSDB folder: a clear one-line error (exit 2), not a traceback or a silent run without it
    assert main(args + ['--outlier-weight', '0.5', '--background', str(tmp_path / 'missing')]) == 2
    assert 'not a GTSDB-layout folder' in capsys.readouterr().err
    assert main(args + ['--outlier-weight', '0.5', '--background', str(scenes),
                        '--background-per-scene', '5']) == 0
    oe = load_bundle(tmp_path / 's').manifest['training']['outlier_exposure']
    assert oe == {'background_images': 20, 'weight': 0.5}
