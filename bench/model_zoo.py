"""model_zoo: teacher vs student(s) on the GTSRB test set: accuracy, calibration, robustness to the
synthetic shifts, rejection of background, GFLOPs, params, batch-1 latency.

Variants (each only when its files exist): the teacher bundle (models/gtsrb_teacher) and the student
bundle (models/gtsrb_student), each as ONNX Runtime fp32 (``full.onnx`` if present, else backbone +
numpy head), ORT int8 (``backbone.int8.onnx`` + head) and torch eager (the same architecture from
``edge_tl_ros.training.models.build_model``; its weights are untrained, so torch eager rows report latency
only). Accuracy: top-1 on the GTSRB official test set (12630 images; 1000 with --quick) through
``Engine.predict_batch``. Latency: one preprocessed 1x3xHxW tensor, model call only, median/p99 over
repeated runs on 1 and 2 threads. GFLOPs and params come from the manifests when they record them,
else they are counted from the ONNX graph (Conv/Gemm/MatMul multiply-accumulates x 2; initializers).
The distillation ablation recorded in the student manifest is copied as is (train-default measures it
with the same code: accuracy, ECE, false-accept rate, shifts).

Per fp32 ORT row also: ``ece`` (expected calibration error of the bundle's scores, 15 bins), ``shifts``
(top-1 under every shift of ``edge_tl_ros.shifts`` at severities 3 and 5, on the same images, one seed
per shift: ``edge_tl_ros.training.evaluate.shift_report``) and ``reject`` (at the bundle's ``min_score``:
the fraction of 3000 GTSDB *test-scene* background windows published as a class, and of test signs
kept; ``edge_tl_ros.calibration.reject_report``). Top level: ``teacher_shift_mean``,
``student_shift_mean``, ``min_teacher_margin_points`` (teacher minus student, worst shift cell),
``student_ece``, ``student_background_false_accept``.

    python -m bench.model_zoo [--quick] [--student DIR] [--teacher DIR] [--data PATH] [--results-dir D]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench import common

NAME = 'model_zoo'


def onnx_cost(path) -> dict:
    """MACs (Conv, Gemm, MatMul) of one image and parameter count of an ONNX model.

    Tensor shapes come from one ONNX Runtime run on a zero image with every operand exposed as an output
    (static shape inference cannot follow the computed ``Pad`` of "same"-padded exports).
    """
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    ops = [n for n in m.graph.node if n.op_type in ('Conv', 'Gemm', 'MatMul')]
    known = set(inits) | {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    want = {x for n in ops for x in (n.output[0], *n.input[:2]) if x and x not in known}
    for name in sorted(want):
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=['CPUExecutionProvider'])
    inp = sess.get_inputs()[0]
    x = np.zeros([1 if not isinstance(d, int) else d for d in inp.shape], np.float32)
    names = [o.name for o in sess.get_outputs()]
    shapes = {k: list(v.shape) for k, v in zip(names, sess.run(names, {inp.name: x}))}
    shapes.update({k: list(t.dims) for k, t in inits.items()})
    macs = 0
    for n in ops:
        out = shapes.get(n.output[0])
        if out is None:
            continue
        if n.op_type == 'Conv' and n.input[1] in shapes:
            macs += int(np.prod(out[1:])) * int(np.prod(shapes[n.input[1]][1:]))  # W: [Cout, Cin/g, kh, kw]
        elif n.op_type in ('Gemm', 'MatMul') and n.input[0] in shapes:
            a = shapes[n.input[0]]
            trans_a = n.op_type == 'Gemm' and any(at.name == 'transA' and at.i for at in n.attribute)
            k = a[0] if trans_a else a[-1]
            macs += int(np.prod(out[1:] or [1])) * int(k)
    params = int(sum(int(np.prod(t.dims)) for t in inits.values() if t.data_type in (1, 10, 11, 16)))
    params_q = int(sum(int(np.prod(t.dims)) for t in inits.values() if t.data_type in (2, 3)))
    return {'macs': macs, 'gflops': 2 * macs / 1e9, 'params_float': params, 'params_int8': params_q}


def _find(d, words, prefix=''):
    """Manifest entries whose key contains one of ``words`` (recursive), as {dotted key: value}."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f'{prefix}{k}'
            if any(w in str(k).lower() for w in words):
                out[key] = v
            else:
                out.update(_find(v, words, key + '.'))
    return out


def manifest_cost(m: dict) -> tuple[float | None, float | None]:
    """(GFLOPs, params) as the manifest records them (None where it does not)."""
    def num(v, word):  # v, else the first number under a key containing ``word``
        if isinstance(v, (int, float)):
            return v
        return next((float(x) for x in _find(m, (word,)).values()
                     if isinstance(x, (int, float)) and not isinstance(x, bool)), None)

    fl = m.get('flops') if isinstance(m.get('flops'), dict) else {}
    return num(fl.get('gflops'), 'gflops'), num(m.get('params'), 'params')


def time_calls(call, reps: int) -> dict:
    """Latency summary (ms) of ``reps`` calls of ``call()``, after ``max(3, reps // 10)`` warm-up calls."""
    for _ in range(max(3, reps // 10)):
        call()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        ts.append((time.perf_counter() - t0) * 1e3)
    return common.lat_summary(ts)


def time_ort(engine, reps: int) -> dict:
    x = np.random.default_rng(0).standard_normal(engine._x.shape).astype(np.float32)
    sess, name_in = engine.session, engine._in_name
    return time_calls(lambda: sess.run(None, {name_in: x}), reps)


def time_torch(model, size: int, threads: int, reps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(1, 3, size, size)
    model.eval()
    with torch.no_grad():
        return time_calls(lambda: model(x), reps)


def variants(root: Path, role: str):
    """(label, engine kwargs, ONNX file) for the ORT variants of a bundle."""
    from edge_tl_ros.bundle import load_bundle

    b = load_bundle(root)
    out = [(f'{role} ORT fp32', dict(mode='full' if b.path('full') else 'feature_extractor', use_int8=False),
            b.path('full') or b.path('backbone'))]
    if b.path('backbone_int8'):
        out.append((f'{role} ORT int8', dict(mode='feature_extractor', use_int8=True),
                    b.path('backbone_int8')))
    return b, out


def bundles(args) -> tuple[list, list]:
    """([(role, root, bundle, variants)] of the bundles that load, [why each other one did not])."""
    from edge_tl_ros.bundle import BundleError

    students = args.student or ([args.bundle] if args.bundle else None)
    if not students:  # every student bundle under models/ (gtsrb_student first)
        students = [str(common.STUDENT)] + sorted(
            str(d) for d in common.STUDENT.parent.glob('*student*') if d.is_dir() and d != common.STUDENT)
    roots = [('teacher', Path(args.teacher))] + [
        ('student' if i == 0 else Path(s).name, Path(s)) for i, s in enumerate(students)]
    present, missing = [], []
    for role, root in roots:
        try:
            present.append((role, root, *variants(root, role)))
        except BundleError as e:
            missing.append(f'{role}: {e}')
    return present, missing


def background(args):
    """(3000 background windows of the GTSDB test scenes, description) or (None, why not)."""
    from edge_tl_ros.gtsdb import SceneError, background_crops, find_gtsdb

    d = Path(args.data).expanduser() if args.data else None
    try:
        root = find_gtsdb((d.parent if d.is_file() else d) / 'gtsdb' if d else None)
        return background_crops(root, 'test', per_scene=10, size=32, seed=1), f'GTSDB test scenes of {root}'
    except (SceneError, OSError) as e:
        return None, f'no GTSDB background crops: {e}'


def quality(b, kw: dict, probs, images, labels, bg) -> dict:
    """ECE, accuracy under the shifts and the background false-accept rate of one fp32 bundle."""
    from edge_tl_ros.calibration import ece, reject_report
    from edge_tl_ros.data import Split
    from edge_tl_ros.engine import Engine
    from edge_tl_ros.training.evaluate import shift_report

    sh = shift_report(b, Split(images, labels, b.class_names), None, (3, 5), kw['mode'], num_threads=2)
    out = {'ece': round(ece(probs, labels), 5),
           'shifts': {k: sh[k] for k in ('accuracy', 'mean', 'worst', 'severities')}}
    min_score = ((b.manifest.get('reject') or {}).get('min_score'))
    if min_score is not None and bg is not None:
        pb = Engine(b, kw['mode'], num_threads=2).predict_batch(bg, 'rgb', batch_size=256)
        out['reject'] = reject_report(probs, labels, pb, float(min_score))
    return out


def ort_row(b, label: str, kw: dict, onnx_path, images, labels, reps: int, mflops, mparams,
            bg=None) -> dict:
    """One ORT variant: accuracy over ``images`` (fp32: also :func:`quality`), graph cost, batch-1
    latency on 1 and 2 threads."""
    from edge_tl_ros.engine import Engine

    h, w = b.input_size
    print(f'[{NAME}] {label} ({b.name}, {h}x{w}) ...', flush=True)
    eng = Engine(b, kw['mode'], num_threads=2, use_int8=kw['use_int8'])
    t0 = time.perf_counter()
    probs = eng.predict_batch(images, 'rgb', batch_size=256)
    eval_s = time.perf_counter() - t0
    cost = onnx_cost(onnx_path)
    lat = {f'{th}t': time_ort(Engine(b, kw['mode'], num_threads=th, use_int8=kw['use_int8']), reps)
           for th in (1, 2)}
    from_manifest = mflops is not None and 'int8' not in label
    extra = {} if kw['use_int8'] else quality(b, kw, probs, images, labels, bg)
    return {
        **extra,
        'model': label, 'bundle': b.name, 'architecture': b.manifest.get('architecture'), 'input_size': h,
        'accuracy': float(np.mean(np.argmax(probs, 1) == labels)), 'n_test': int(len(images)),
        'gflops': mflops if from_manifest else cost['gflops'],
        'gflops_source': 'manifest' if from_manifest else 'onnx graph',
        'params': mparams if mparams is not None else cost['params_float'] + cost['params_int8'],
        'onnx_cost': cost, 'latency_ms': lat['1t']['p50_ms'], 'latency_1t': lat['1t'],
        'latency_2t': lat['2t'], 'eval_images_per_s': len(images) / eval_s,
    }


def torch_row(role: str, b, reps: int, like: dict) -> dict | None:
    """Torch eager, same architecture, untrained weights: latency only (None without torch)."""
    m, h = b.manifest, b.input_size[0]
    try:
        from edge_tl_ros.training.models import build_model

        model = build_model(m.get('architecture'), len(b.class_names), input_size=h, pretrained=False)
        lat = {f'{th}t': time_torch(model, h, th, max(5, reps // 4)) for th in (1, 2)}
    except Exception as e:  # torch or the architecture builder unavailable
        print(f'[{NAME}] {role} torch eager skipped: {type(e).__name__}: {e}')
        return None
    return {'model': f'{role} torch eager', 'bundle': b.name, 'architecture': m.get('architecture'),
            'input_size': h, 'accuracy': None, 'accuracy_note': 'untrained weights: latency only',
            'gflops': like['gflops'], 'params': like['params'], 'latency_ms': lat['1t']['p50_ms'],
            'latency_1t': lat['1t'], 'latency_2t': lat['2t']}


def run(args) -> dict:
    t_start = time.monotonic()
    test = common.gtsrb_test(args.data)
    present, missing = bundles(args)
    if not any(r == 'student' for r, *_ in present):
        raise common.Skip(f'trained student bundle absent ({"; ".join(missing)})')
    n_eval = 1000 if args.quick else len(test)
    reps = 20 if args.quick else 200
    idx = np.random.default_rng(0).permutation(len(test))[:n_eval]
    images, labels = test.images[idx], test.labels[idx]
    bg, bg_desc = background(args)
    rows = []
    for role, root, b, vs in present:
        for label, kw, onnx_path in vs:
            rows.append(ort_row(b, label, kw, onnx_path, images, labels, reps, *manifest_cost(b.manifest),
                                bg=bg))
        t_row = torch_row(role, b, reps, rows[-1])
        if t_row is not None:
            rows.append(t_row)
    student = next(b for r, _, b, _ in present if r == 'student')
    ablation = _find(student.manifest, ('ablation', 'distill'))
    test_metrics = (student.manifest.get('metrics') or {}).get('test')
    if ablation and test_metrics:
        ablation['student_manifest_metrics.test'] = test_metrics
    fp32 = {r['model'].split()[0]: r for r in rows if r['model'].endswith('ORT fp32')}
    t_sh, s_sh = (fp32.get(k, {}).get('shifts') for k in ('teacher', 'student'))
    margins = ({f'{n}@{v}': round(100 * (t_sh['accuracy'][n][v] - s_sh['accuracy'][n][v]), 2)
                for n in s_sh['accuracy'] for v in s_sh['accuracy'][n]} if t_sh and s_sh else {})
    st = fp32.get('student', {})
    data = {
        'teacher_shift_mean': t_sh and t_sh['mean'], 'student_shift_mean': s_sh and s_sh['mean'],
        'min_teacher_margin_points': min(margins.values()) if margins else None,
        'student_ece': st.get('ece'),
        'student_background_false_accept': (st.get('reject') or {}).get('background_false_accept_rate'),
        'teacher_margin_points': margins, 'background': bg_desc,
        'models': {r['model']: {k: r[k] for k in ('accuracy', 'gflops', 'latency_ms')} for r in rows},
        'rows': rows, 'distillation_ablation': ablation or None, 'missing': missing, 'n_test': int(n_eval),
        'definitions': {
            'latency_ms': 'batch 1, model call only (ORT session.run or torch forward), p50 on '
            '1 thread; latency_2t on 2 threads',
            'accuracy': 'top-1 on the GTSRB official test set (a seeded subset with --quick)',
            'gflops': '2 x multiply-accumulates of one image',
            'shifts': 'top-1 on the same test images under each edge_tl_ros.shifts shift, severities 3 and 5',
            'teacher_margin_points': 'teacher minus student top-1 (points) per shift@severity',
            'ece': 'expected calibration error (15 confidence bins) of the shipped (calibrated) scores',
            'reject': "at the bundle's min_score: background windows published as a class, signs kept",
        },
    }
    table = [{'model': r['model'], 'in': r['input_size'], 'acc': r['accuracy'], 'gflops': r['gflops'],
              'shift_mean': (r.get('shifts') or {}).get('mean'), 'ece': r.get('ece'),
              'bg_accept': (r.get('reject') or {}).get('background_false_accept_rate'),
              'params_M': (r['params'] or 0) / 1e6, 'p50_1t_ms': r['latency_1t']['p50_ms'],
              'p99_1t_ms': r['latency_1t']['p99_ms'], 'p50_2t_ms': r['latency_2t']['p50_ms']} for r in rows]
    plot(rows, ablation, args)
    common.report(NAME, data, args, t_start, table, title=f'{n_eval} test images')
    return data


def plot(rows: list[dict], ablation, args) -> None:
    fig, (ax, ax2) = common.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={'width_ratios': [1, 1.4]})
    # right: accuracy under each shift at severity 5, teacher / student / alpha=0 student
    series = [(r['model'].replace(' ORT fp32', ''), r['shifts']['accuracy']) for r in rows if r.get('shifts')]
    abl = next((v['shifts']['accuracy'] for v in (ablation or {}).values()
                if isinstance(v, dict) and isinstance(v.get('shifts'), dict)), None)
    if abl:
        series.append(('student alpha=0 (manifest)', abl))
    if series:
        names = list(series[0][1])
        width = 0.8 / len(series)
        for i, (lab, acc) in enumerate(series):
            ax2.bar(np.arange(len(names)) + i * width, [100 * acc[n].get('5', np.nan) for n in names], width,
                    label=lab)
        ax2.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, fontsize=8)
        ax2.set(ylabel='top-1 under shift, severity 5 (%)', ylim=(0, 100))
        ax2.legend(fontsize=8)
    for r in rows:
        if r['accuracy'] is not None:
            ax.scatter(r['latency_1t']['p50_ms'], r['accuracy'] * 100)
            ax.annotate(r['model'], (r['latency_1t']['p50_ms'], r['accuracy'] * 100), fontsize=8)
    ax.set(xscale='log', xlabel='batch-1 latency, 1 thread (ms, log)', ylabel='GTSRB test accuracy (%)')
    common.savefig(fig, NAME, args)


def add_args(p) -> None:
    p.add_argument('--student', nargs='+', default=None,
                   help='student bundle(s) (default --bundle, else models/gtsrb_student and every '
                   'models/*student* dir)')
    common.add_teacher_data_args(p)


main = common.entry(NAME, run, __doc__, add_args)


if __name__ == '__main__':
    raise SystemExit(main())
