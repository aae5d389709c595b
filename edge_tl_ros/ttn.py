"""Test-time normalisation of a backbone: the teacher re-normalises its activations on the robot's frames.

Batch-norm networks fail under a domain shift (night, fog, blur, sensor noise) largely because the
statistics their BN layers were frozen with no longer describe the activations. Recomputing them on
target data (AdaBN, "test-time BN") recovers much of the loss without a single label. Exported
backbones have their BN layers folded into the convolutions, so the same correction is written as a
moment match on every convolution output ``y`` (channel ``c``, batch statistics over N, H, W)::

    y' = (y - mean_batch[c]) / sqrt(var_batch[c] + eps) * std_source[c] + mean_source[c]

For a folded conv+BN, ``mean_source``/``std_source`` (measured on source images once, at export) are
exactly BN's ``beta``/``|gamma|``, so ``y'`` is what the unfolded network would compute with BN
statistics taken from the batch. For convolutions without BN it is a plain first/second moment match.

- :func:`compute_norm_stats` measures the source moments of a backbone's conv outputs
  (``norm_stats.npz`` in a bundle, written by ``export_bundle`` and ``edge-tl norm-stats``);
- :func:`ttn_model` rewrites the backbone ONNX graph (the ``onnx`` package; needed only where this
  runs, i.e. the adaptation round or the workstation, never the perception node);
- :class:`TestTimeNormSession` runs it: a batch's output depends on the whole batch, so callers pass
  batches of mixed frames (:func:`balanced_batches`), never single frames;
- :func:`adapted_backbone` is the deployable form (AdaBN): the moments of the robot's frames, measured
  once, folded into the convolution weights, so the backbone runs frame by frame again and can be
  hot-swapped into the perception node like a head (``HeadRegistry.add(..., backbone=...)``).

The adaptation node uses it to pseudo-label with the teacher (``teacher_test_time_norm``); on the
bundled GTSRB shifts it lifts the teacher's label accuracy by about 10 points (bench.adaptation).
No ROS and no torch here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NORM_STATS_FILE = 'norm_stats.npz'
DEFAULT_EPS = 1e-5
MIN_BATCH = 16  # batch statistics from fewer frames are too noisy to normalise with


class TTNError(ValueError):
    """Norm stats missing, stale (do not fit the backbone graph) or unusable input."""


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - onnx is in requirements/runtime.txt
        raise TTNError('test-time normalisation needs the onnx package (pip install onnx)') from e
    return onnx


def conv_outputs(model) -> list[str]:
    """Output tensor names of the graph's Conv nodes, in graph order."""
    return [n.output[0] for n in model.graph.node if n.op_type == 'Conv']


def _session(model_bytes: bytes, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=['CPUExecutionProvider'])


def compute_norm_stats(backbone_path, batches, threads: int = 1) -> dict:
    """Source moments of every conv output -> ``{'names', 'mean', 'std', 'sizes', 'count'}``.

    ``batches`` yields normalised ``[N,3,H,W]`` float32 arrays (the backbone's input) of source images.
    Moments are accumulated in float64 over all batches (N, H, W pooled per channel).
    """
    onnx = _onnx()
    model = onnx.load(str(backbone_path))
    names = conv_outputs(model)
    if not names:
        raise TTNError(f'{backbone_path}: no Conv nodes to normalise')
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = _session(model.SerializeToString(), threads)
    in_name = sess.get_inputs()[0].name
    s1 = s2 = None
    count = np.zeros(len(names), np.float64)
    frames = 0
    for x in batches:
        outs = sess.run(names, {in_name: np.ascontiguousarray(x, np.float32)})
        if s1 is None:
            s1 = [np.zeros(o.shape[1], np.float64) for o in outs]
            s2 = [np.zeros(o.shape[1], np.float64) for o in outs]
        for k, o in enumerate(outs):
            o = o.astype(np.float64)
            s1[k] += o.sum(axis=(0, 2, 3))
            s2[k] += np.square(o).sum(axis=(0, 2, 3))
            count[k] += o.shape[0] * o.shape[2] * o.shape[3]
        frames += len(x)
    if s1 is None or frames == 0:
        raise TTNError('no source images to measure norm stats on')
    mean = [a / c for a, c in zip(s1, count)]
    std = [np.sqrt(np.maximum(b / c - m * m, 0.0)) for b, c, m in zip(s2, count, mean)]
    return {'names': np.array(names), 'mean': np.concatenate(mean).astype(np.float32),
            'std': np.concatenate(std).astype(np.float32),
            'sizes': np.array([len(m) for m in mean], np.int64), 'count': np.int64(frames)}


def save_norm_stats(path, stats: dict) -> Path:
    from .atomic import atomic_write_bytes, npz_bytes

    return atomic_write_bytes(Path(path), npz_bytes(**stats))


def load_norm_stats(path) -> dict:
    from .atomic import load_npz

    try:
        z = load_npz(path)
    except ValueError as e:
        raise TTNError(str(e)) from e
    missing = [k for k in ('names', 'mean', 'std', 'sizes') if k not in z]
    if missing:
        raise TTNError(f'{path}: norm stats need arrays {missing}')
    sizes = z['sizes'].astype(np.int64)
    if len(sizes) != len(z['names']) or int(sizes.sum()) != len(z['mean']) or len(z['mean']) != len(z['std']):
        raise TTNError(f'{path}: norm stats arrays do not fit together')
    if not (np.isfinite(z['mean']).all() and np.isfinite(z['std']).all()) or (z['std'] < 0).any():
        raise TTNError(f'{path}: norm stats contain NaN/Inf or negative std')
    return z


def ttn_model(backbone_path, stats: dict, eps: float = DEFAULT_EPS):
    """The backbone's ONNX graph with every conv output re-normalised by batch statistics (a ModelProto)."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    model = onnx.load(str(backbone_path))
    g = model.graph
    names = [str(n) for n in stats['names']]
    sizes = [int(s) for s in stats['sizes']]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    convs = [n for n in g.node if n.op_type == 'Conv']
    if [n.output[0] for n in convs] != names:
        raise TTNError(f'{backbone_path}: norm stats were measured on a different graph '
                       f'({len(names)} conv outputs recorded, the graph has {len(convs)}); re-run '
                       '`edge-tl norm-stats` for this bundle')
    opset = max([o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')] or [13])
    axes_as_input = opset >= 18  # ReduceMean took axes as an attribute before opset 18
    if axes_as_input:
        g.initializer.append(numpy_helper.from_array(np.array([0, 2, 3], np.int64), 'ttn_axes'))
    g.initializer.append(numpy_helper.from_array(np.array(float(eps), np.float32), 'ttn_eps'))

    def reduce_mean(x, out):
        if axes_as_input:
            return helper.make_node('ReduceMean', [x, 'ttn_axes'], [out], keepdims=1)
        return helper.make_node('ReduceMean', [x], [out], axes=[0, 2, 3], keepdims=1)

    nodes = []
    for k, conv in enumerate(convs):
        c = sizes[k]
        mu = stats['mean'][offsets[k]:offsets[k + 1]].reshape(1, c, 1, 1).astype(np.float32)
        sd = stats['std'][offsets[k]:offsets[k + 1]].reshape(1, c, 1, 1).astype(np.float32)
        p = f'ttn{k}_'
        g.initializer.extend([numpy_helper.from_array(mu, p + 'mu_src'),
                              numpy_helper.from_array(sd, p + 'sd_src')])
        out = conv.output[0]
        raw = p + 'raw'
        conv.output[0] = raw
        nodes.append((conv, [
            reduce_mean(raw, p + 'mean'),
            helper.make_node('Sub', [raw, p + 'mean'], [p + 'centred']),
            helper.make_node('Mul', [p + 'centred', p + 'centred'], [p + 'sq']),
            reduce_mean(p + 'sq', p + 'var'),
            helper.make_node('Add', [p + 'var', 'ttn_eps'], [p + 'var_eps']),
            helper.make_node('Sqrt', [p + 'var_eps'], [p + 'sd']),
            helper.make_node('Div', [p + 'centred', p + 'sd'], [p + 'z']),
            helper.make_node('Mul', [p + 'z', p + 'sd_src'], [p + 'scaled']),
            helper.make_node('Add', [p + 'scaled', p + 'mu_src'], [out]),
        ]))
    for conv, new in nodes:  # insert each block right after its conv: the graph stays topologically sorted
        at = list(g.node).index(conv) + 1
        for j, n in enumerate(new):
            g.node.insert(at + j, n)
    onnx.checker.check_model(model)
    return model


def domain_moments(backbone_path, stats: dict, x: np.ndarray, threads: int = 1,
                   eps: float = DEFAULT_EPS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per conv output, the (mean, std) of the target frames ``x`` ([N,3,H,W] normalised, N >= MIN_BATCH)
    with every earlier conv output already re-normalised, as AdaBN measures them: one batch of all N."""
    onnx = _onnx()
    if len(x) < MIN_BATCH:
        raise TTNError(f'domain moments need at least {MIN_BATCH} frames, got {len(x)}')
    model = ttn_model(backbone_path, stats, eps)
    k = len(stats['names'])
    outs = [f'ttn{i}_{s}' for i in range(k) for s in ('mean', 'var')]
    for n in outs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = _session(model.SerializeToString(), threads)
    r = sess.run(outs, {sess.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})
    return [(r[2 * i].ravel().astype(np.float64), np.sqrt(r[2 * i + 1].ravel().astype(np.float64) + eps))
            for i in range(k)]


def adapted_backbone(backbone_path, stats: dict, x: np.ndarray, threads: int = 1,
                     eps: float = DEFAULT_EPS) -> bytes:
    """The backbone with the target frames' moments folded into its convolutions (serialised ONNX).

    Every conv output ``y`` becomes ``(y - mean_target) * std_source / std_target + mean_source``, written
    into the conv's weight and bias (a conv without a bias gets one): for a BN-folded conv this is the
    network with its BN statistics re-estimated on the target frames. Same inputs, outputs and cost as the
    original; the perception node runs it on single frames. ``x``: [N,3,H,W] normalised target frames.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    moments = domain_moments(backbone_path, stats, x, threads, eps)
    model = onnx.load(str(backbone_path))
    init = {i.name: i for i in model.graph.initializer}
    off = np.concatenate([[0], np.cumsum(stats['sizes'])]).astype(np.int64)
    for k, conv in enumerate(n for n in model.graph.node if n.op_type == 'Conv'):
        if conv.input[1] not in init:
            raise TTNError(f'{backbone_path}: conv {conv.name} weight is not a constant; cannot fold')
        mu_s = stats['mean'][off[k]:off[k + 1]].astype(np.float64)
        sd_s = stats['std'][off[k]:off[k + 1]].astype(np.float64)
        mu_t, sd_t = moments[k]
        a = sd_s / sd_t
        w = numpy_helper.to_array(init[conv.input[1]]).astype(np.float64)
        if len(conv.input) > 2 and conv.input[2]:
            b = numpy_helper.to_array(init[conv.input[2]]).astype(np.float64)
            bias_name = conv.input[2]
        else:
            b, bias_name = np.zeros(w.shape[0]), f'{conv.output[0]}_adapted_bias'
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(len(w), np.float32), bias_name))
            init[bias_name] = model.graph.initializer[-1]
            while len(conv.input) < 3:
                conv.input.append('')
            conv.input[2] = bias_name
        new_w = (w * a.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = ((b - mu_t) * a + mu_s).astype(np.float32)
        if not (np.isfinite(new_w).all() and np.isfinite(new_b).all()):
            raise TTNError('the adapted backbone has NaN/Inf weights (degenerate target frames)')
        init[conv.input[1]].CopyFrom(numpy_helper.from_array(new_w, conv.input[1]))
        init[bias_name].CopyFrom(numpy_helper.from_array(new_b, bias_name))
    onnx.checker.check_model(model)
    return model.SerializeToString()


class TestTimeNormSession:
    """A backbone session whose activations are normalised by each batch's own statistics."""

    __test__ = False  # not a pytest class

    def __init__(self, backbone_path, stats: dict, threads: int = 1, eps: float = DEFAULT_EPS,
                 min_batch: int = MIN_BATCH):
        self.sess = _session(ttn_model(backbone_path, stats, eps).SerializeToString(), threads)
        self.in_name = self.sess.get_inputs()[0].name
        self.out_name = self.sess.get_outputs()[0].name
        self.min_batch = int(min_batch)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Features of one normalised batch ``[N,3,H,W]``; N must be at least ``min_batch``."""
        if len(x) < self.min_batch:
            raise TTNError(f'test-time normalisation needs batches of >= {self.min_batch} frames, '
                           f'got {len(x)}')
        return self.sess.run([self.out_name], {self.in_name: np.ascontiguousarray(x, np.float32)})[0]


def add_to_bundle(root, images_rgb: np.ndarray, threads: int = 2, batch_size: int = 250,
                  source: str = 'source images') -> dict:
    """Measure norm stats of bundle ``root``'s backbone on source RGB images; write ``norm_stats.npz``.

    The file is listed in the manifest (``files.norm_stats``, with its sha256) and summarised under
    ``norm_stats``. Returns that summary.
    """
    from .bundle import load_bundle, read_manifest, write_manifest
    from .engine import Engine

    bundle = load_bundle(root)
    if len(images_rgb) < MIN_BATCH:
        raise TTNError(f'need at least {MIN_BATCH} source images for norm stats, got {len(images_rgb)}')
    eng = Engine(bundle, 'feature_extractor', num_threads=threads)
    batches = (eng.prepare_batch(images_rgb[i:i + batch_size], 'rgb')
               for i in range(0, len(images_rgb), batch_size))
    stats = compute_norm_stats(bundle.files['backbone'], batches, threads=threads)
    save_norm_stats(Path(root) / NORM_STATS_FILE, stats)
    manifest = read_manifest(root)
    manifest['files'] = {**manifest['files'], 'norm_stats': NORM_STATS_FILE}
    summary = {'source': str(source), 'images': int(stats['count']), 'conv_outputs': int(len(stats['names'])),
               'used_for': 'test-time normalisation of teacher pseudo-labels (edge_tl_ros/ttn.py)'}
    manifest['norm_stats'] = summary
    write_manifest(root, manifest)
    return summary


def balanced_batches(n: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Split ``range(n)`` into shuffled batches of ``batch_size`` to ``2 * batch_size - 1`` indices.

    Shuffling mixes frames recorded at different times (a robot sees the same sign for many frames in a
    row) so batch statistics describe the domain, not one object; no batch is a small remainder.
    """
    if n <= 0:
        return []
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, n // max(1, int(batch_size)))
    return [np.sort(b) for b in np.array_split(order, k)]
