"""Export a trained :class:`~edge_tl_ros.training.models.Classifier` to a model bundle.

Writes ``backbone.onnx`` (image -> features), ``head.npz`` (the Linear head, numpy), optionally
``full.onnx`` (image -> logits) and ``anchor.npz`` (class-balanced source-domain features), then the
manifest via :func:`edge_tl_ros.bundle.write_manifest` (which fills in the sha256 of every file; the
training commands add their keys through ``manifest_extra``, see :mod:`edge_tl_ros.training.manifest`).
ONNX files come from the legacy TorchScript exporter (``dynamo=False``: single-file models), opset 17,
with a dynamic batch axis; every export is checked against torch with ONNX Runtime (:func:`check_parity`
raises :class:`ExportError` when the outputs differ beyond tolerance).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import torch

from ..bundle import Head, write_manifest
from ..data import Split
from .loop import to_tensor_batch
from .manifest import plain

OPSET = 17


class ExportError(AssertionError):
    """The exported ONNX graph does not reproduce the torch model."""


def export_onnx(module: torch.nn.Module, path: str | Path, input_size: int, output_name: str) -> Path:
    """Export ``module`` (image [N,3,S,S] -> [N,K]) to a single-file ONNX model with a dynamic batch axis."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(2, 3, input_size, input_size)
    tmp = path.with_name('.' + path.name + '.tmp')
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(tmp),
            input_names=['image'],
            output_names=[output_name],
            dynamic_axes={'image': {0: 'N'}, output_name: {0: 'N'}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    model = onnx.load(str(tmp))
    onnx.checker.check_model(model)
    tmp.replace(path)
    return path


def check_parity(
    module: torch.nn.Module, onnx_path: str | Path, x: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-3
) -> float:
    """Run ``x`` through torch and ONNX Runtime; raise ExportError if they differ. Returns max abs error."""
    import onnxruntime as ort

    module = module.eval()
    with torch.no_grad():
        ref = module(x.contiguous()).float().numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=['CPUExecutionProvider'])
    got = sess.run(None, {sess.get_inputs()[0].name: x.contiguous().numpy().astype(np.float32)})[0]
    if got.shape != ref.shape:
        raise ExportError(f'{onnx_path}: ONNX output shape {got.shape} != torch {ref.shape}')
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    tol = atol + rtol * float(np.abs(ref).max() if ref.size else 0.0)
    if not np.isfinite(got).all() or err > tol:
        raise ExportError(f'{onnx_path}: ONNX Runtime output differs from torch by {err:.3g} (> {tol:.3g})')
    return err


def parity_input(
    model, images: np.ndarray | None, input_size: int, n: int = 16, seed: int = 0
) -> torch.Tensor:
    """Real images when given (normalised as the model expects), plus a few random ones."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(4, 3, input_size, input_size, generator=g)]
    if images is not None and len(images):
        idx = np.linspace(0, len(images) - 1, min(n, len(images))).astype(int)
        mean, std = model.norm
        parts.insert(0, to_tensor_batch(images[idx], mean, std, input_size).contiguous())
    return torch.cat(parts)


def select_anchor(split: Split, per_class: int = 16, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced anchor set: up to ``per_class`` images of every class, spread over
    the class's images (so over many tracks, not 16 frames of one sign)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(split.class_names)):
        idx = np.flatnonzero(split.labels == c)
        if len(idx) == 0:
            continue
        k = min(per_class, len(idx))
        # one pick per equal-width stratum of the (track-ordered) class images
        edges = np.linspace(0, len(idx), k + 1).astype(int)
        out += [int(idx[rng.integers(a, max(a + 1, b))]) for a, b in zip(edges[:-1], edges[1:])]
    return np.asarray(sorted(out), np.int64)


def anchor_images(images: np.ndarray, input_size: int) -> np.ndarray:
    """Anchor images at the bundle's input size (the rule every path resizes with): the source check of
    an adapted backbone runs them through it."""
    from ..imaging import resize_to

    if images.shape[1:3] == (input_size, input_size):
        return np.ascontiguousarray(images, np.uint8)
    return np.stack([resize_to(im, input_size, input_size) for im in images]).astype(np.uint8)


def onnx_features(
    onnx_path: Path, model, images: np.ndarray, input_size: int, batch: int = 256
) -> np.ndarray:
    """Features from the exported backbone (what the robot will compute)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=['CPUExecutionProvider'])
    mean, std = model.norm
    out = [
        sess.run(
            None,
            {'image': to_tensor_batch(images[i : i + batch], mean, std, input_size).contiguous().numpy()},
        )[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out).astype(np.float32)


def export_bundle(
    model,
    out: str | Path,
    class_names: tuple[str, ...],
    input_size: int,
    name: str,
    with_full: bool = True,
    anchor_split: Split | None = None,
    anchor_per_class: int = 16,
    parity_images: np.ndarray | None = None,
    manifest_extra: dict | None = None,
    norm_stats_frames: int = 2000,
    log=print,
) -> Path:
    """Write a complete bundle for ``model`` into ``out`` and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = parity_input(model, parity_images, input_size)
    files = {'backbone': 'backbone.onnx', 'head': 'head.npz'}
    export_onnx(model.backbone, out / files['backbone'], input_size, 'features')
    parity = {'backbone_max_abs_err': check_parity(model.backbone, out / files['backbone'], x)}
    w = model.head.weight.detach().float().numpy()
    b = model.head.bias.detach().float().numpy()
    Head(w, b, tuple(class_names)).save(out / files['head'])
    if with_full:
        files['full'] = 'full.onnx'
        export_onnx(model, out / files['full'], input_size, 'logits')
        parity['full_max_abs_err'] = check_parity(model, out / files['full'], x)
    else:
        (out / 'full.onnx').unlink(missing_ok=True)
    # the numpy head on the ONNX features must reproduce torch's logits too
    with torch.no_grad():
        ref = model(x).numpy()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out / files['backbone']), so, providers=['CPUExecutionProvider'])
    head_logits = sess.run(None, {'image': x.numpy()})[0] @ w.T + b
    err = float(np.abs(head_logits - ref).max())
    if err > 1e-3 + 1e-3 * float(np.abs(ref).max()):
        raise ExportError(f'backbone.onnx + head.npz logits differ from torch by {err:.3g}')
    parity['head_logits_max_abs_err'] = err
    if anchor_split is not None and len(anchor_split):
        from ..atomic import atomic_write_bytes, npz_bytes

        idx = select_anchor(anchor_split, anchor_per_class)
        feats = onnx_features(out / files['backbone'], model, anchor_split.images[idx], input_size)
        images = anchor_images(anchor_split.images[idx], input_size)
        atomic_write_bytes(out / 'anchor.npz', npz_bytes(features=feats, labels=anchor_split.labels[idx],
                                                         images=images))
        files['anchor'] = 'anchor.npz'
    mean, std = model.norm
    manifest = {
        'format_version': 1,
        'name': name,
        'task': 'classification',
        'architecture': model.arch,
        'class_names': [str(c) for c in class_names],
        'input': {
            'height': int(input_size),
            'width': int(input_size),
            'color_order': 'rgb',
            'layout': 'NCHW',
            'mean': [float(v) for v in mean],
            'std': [float(v) for v in std],
        },
        'feature_size': int(model.feature_size),
        'files': files,
        'created': _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        'export': {
            'exporter': 'torch.onnx.export(dynamo=False)',
            'opset': OPSET,
            'torch': str(torch.__version__),
            'parity_vs_torch': {k: float(f'{v:.3g}') for k, v in parity.items()},
        },
    }
    if 'anchor' in files:
        manifest['anchor'] = {
            'source': 'training split',
            'per_class': int(anchor_per_class),
            'count': int(len(idx)),
            'images': 'the anchor images at the input size (uint8 RGB): source check of adapted backbones',
        }
    manifest.update(manifest_extra or {})
    write_manifest(out, plain(manifest))
    n_stats = min(int(norm_stats_frames), len(anchor_split)) if anchor_split is not None else 0
    if n_stats >= 16:  # source activation statistics for test-time normalisation (edge_tl_ros/ttn.py)
        from ..ttn import add_to_bundle

        pick = np.random.default_rng(0).choice(len(anchor_split), n_stats, replace=False)
        add_to_bundle(out, anchor_split.images[np.sort(pick)],
                      source=f'training split [{n_stats} random images, seed 0]')
        files['norm_stats'] = 'norm_stats.npz'
    log(f'exported bundle {out} (files: {", ".join(files.values())}; parity {parity})')
    return out

