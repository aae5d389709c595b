"""Student inference with ONNX Runtime: where a frame is turned into class scores.

Deployment modes (from the original edge-TL design):

- ``full``: the fused ``full.onnx`` (backbone + head) - fastest, but the head cannot be swapped.
- ``feature_extractor``: ``backbone.onnx`` in ONNX Runtime + the linear head in numpy; the head is an
  immutable :class:`~edge_tl_ros.bundle.Head` swapped with one reference assignment (atomic under the
  GIL), so the next frame uses the new head and no frame waits for a lock.
- ``incremental``: ``feature_extractor`` that also hands out the pooled features (for the adaptation
  node).

The per-frame path (:meth:`Engine.infer`) crops the ROI as a view, resizes with OpenCV straight from
the message buffer, converts colour on the small image only, and normalises into a pre-allocated input
tensor. Its output is checked for NaN/Inf (the D features and the C probabilities: microseconds): a
non-finite frame raises :class:`~edge_tl_ros.imaging.FrameError` ``non_finite`` (a degenerate manifest
``std``, a corrupt model or head), never scores that would publish as an empty classification.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .bundle import BundleError, Head, ModelBundle
from .imaging import FrameError, downscale, resize_to, to_order

MODES = ('full', 'feature_extractor', 'incremental')
PROVIDERS = {
    'cpu': 'CPUExecutionProvider',
    'cuda': 'CUDAExecutionProvider',
    'tensorrt': 'TensorrtExecutionProvider',
}


class EngineError(ValueError):
    """Bad engine configuration (mode, provider, head incompatible with the deployment mode)."""


@dataclass
class Prediction:
    probs: np.ndarray  # [C] float32, softmax of the logits
    features: np.ndarray | None  # [D] float32 in feature_extractor/incremental modes
    head: Head | None  # the head that produced probs (None in full mode)

    def topk(self, k: int, threshold: float = 0.0) -> list[tuple[int, float]]:
        return topk(self.probs, k, threshold)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def topk(probs: np.ndarray, k: int, threshold: float = 0.0) -> list[tuple[int, float]]:
    k = max(1, min(int(k), probs.shape[-1]))
    idx = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[-1] else np.arange(probs.shape[-1])
    idx = idx[np.argsort(-probs[idx])]
    return [(int(i), float(probs[i])) for i in idx if probs[i] >= threshold]


def make_session(path, num_threads: int = 1, provider: str = 'cpu', low_priority: bool = False):
    """An ONNX Runtime session with bounded threads; returns (session, provider actually used)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise EngineError(f'unknown execution provider {provider!r}; choose one of {list(PROVIDERS)}')
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(num_threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if low_priority:
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    available = ort.get_available_providers()
    want = PROVIDERS[provider]
    providers = [want, 'CPUExecutionProvider'] if want in available and want != 'CPUExecutionProvider' \
        else ['CPUExecutionProvider']
    what = 'adapted backbone' if isinstance(path, bytes) else path
    try:
        sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers)
    except Exception as e:  # onnxruntime's own exception types
        raise BundleError(f'{what}: ONNX Runtime cannot load it: {str(e).splitlines()[0][:200]}') from e
    used = sess.get_providers()[0]
    return sess, used


class Engine:
    """Run a bundle's student on single frames (hot path) or batches (evaluation, adaptation)."""

    def __init__(self, bundle: ModelBundle, mode: str = 'feature_extractor', num_threads: int = 1,
                 provider: str = 'cpu', use_int8: bool = False, head: Head | None = None,
                 low_priority: bool = False, backbone: bytes | None = None,
                 backbone_version: int | None = None):
        """``backbone``: serialised ONNX that replaces the bundle's backbone (an adapted version from the head
        registry, ``backbone_version`` its version); validated here: same input, ``feature_size`` outputs."""
        if mode not in MODES:
            raise EngineError(f'unknown deployment mode {mode!r}; choose one of {list(MODES)}')
        self.bundle = bundle
        self.mode = mode
        h, w = bundle.input_size
        self.input_hw = (h, w)
        self.color_order = bundle.color_order
        self._mean = bundle.mean.reshape(3, 1, 1)
        self._inv_std = (1.0 / bundle.std).reshape(3, 1, 1).astype(np.float32)
        self.backbone_version = None  # None: the bundle's own backbone
        if backbone is not None:
            if mode == 'full':
                raise EngineError('deployment mode full has the bundle backbone fused into full.onnx; use '
                                  'feature_extractor or incremental with an adapted backbone')
            path = backbone
            self.backbone_version = backbone_version
        elif mode == 'full':
            path = bundle.path('full')
            if path is None:
                raise EngineError(f'bundle {bundle.name} has no full.onnx; use mode feature_extractor')
        else:
            path = bundle.path('backbone_int8') if use_int8 else None
            if use_int8 and path is None:
                raise EngineError(f'bundle {bundle.name} has no int8 backbone')
            path = path or bundle.path('backbone')
        what = 'adapted backbone' + ('' if backbone_version is None else f' v{backbone_version}')
        self.model_path = path if backbone is None else f'<{what}>'
        self.session, self.provider = make_session(path, num_threads, provider, low_priority)
        self._in_name = self.session.get_inputs()[0].name
        self._out_name = self.session.get_outputs()[0].name
        self._x = np.zeros((1, 3, h, w), np.float32)  # pre-allocated input tensor
        self._xb = np.zeros((0, 3, h, w), np.float32)  # batch input of infer_many (grown on demand)
        if backbone is not None:
            try:
                out = self.session.run([self._out_name], {self._in_name: self._x})[0]
            except Exception as e:  # onnxruntime's exception types: wrong input rank/shape/type
                raise BundleError(f'{what} does not take the bundle\'s '
                                  f'[1,3,{h},{w}] input: {str(e).splitlines()[0][:200]}') from e
            if out.shape != (1, bundle.feature_size) or not np.isfinite(out).all():
                raise BundleError(f'{what} gives {out.shape} outputs '
                                  f'(finite: {bool(np.isfinite(out).all())}), the bundle needs '
                                  f'(1, {bundle.feature_size})')
        self.head: Head | None = None
        if mode != 'full':
            self.swap_head(head or bundle.head)

    # -- head swap -------------------------------------------------------------------------------------
    def swap_head(self, head: Head) -> Head | None:
        """Validate ``head`` and make it the one the next frame uses. Returns the previous head."""
        if self.mode == 'full':
            raise EngineError('deployment mode full has the head fused into full.onnx; '
                              'use feature_extractor or incremental to swap heads')
        if head.feature_size != self.bundle.feature_size:
            raise BundleError(f'head v{head.version} expects {head.feature_size} features, '
                              f'backbone gives {self.bundle.feature_size}')
        base = self.bundle.class_names
        if head.class_names[:len(base)] != base:
            raise BundleError(f'head v{head.version} classes do not extend the bundle classes')
        old, self.head = self.head, head  # one reference assignment: atomic for readers
        return old

    # -- per-frame path --------------------------------------------------------------------------------
    def preprocess(self, img: np.ndarray, order: str,
                   roi: tuple[int, int, int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """ROI crop (view) -> resize (from the buffer) -> colour on the small image -> normalised tensor
        (``out``: a [1,3,h,w] view to write into; default the pre-allocated single-frame input)."""
        if roi is not None:
            x, y, rw, rh = roi
            H, W = img.shape[:2]
            x0, y0 = min(max(0, x), W - 1), min(max(0, y), H - 1)
            x1, y1 = min(W, x0 + rw) if rw > 0 else W, min(H, y0 + rh) if rh > 0 else H
            img = img[y0:y1, x0:x1]
        small = downscale(img, *self.input_hw)
        small = to_order(small, order, self.color_order)
        x = self._x if out is None else out
        np.subtract(small.transpose(2, 0, 1), self._mean, out=x[0], casting='unsafe')
        x[0] *= self._inv_std
        return x

    def infer(self, img: np.ndarray, order: str, roi=None) -> Prediction:
        """One frame -> :class:`Prediction`; raises :class:`FrameError` ``non_finite`` on NaN/Inf."""
        x = self.preprocess(img, order, roi)
        return self._run(x)

    def infer_many(self, frames: list) -> list:
        """Several frames (``[(img, order, roi), ...]``, e.g. the newest frame of each camera) in one ONNX
        Runtime call -> one :class:`Prediction` or :class:`FrameError` per frame, in order: a frame that
        cannot be preprocessed or whose outputs are NaN/Inf fails alone, the others are served."""
        n = len(frames)
        if self._xb.shape[0] < n:
            self._xb = np.zeros((n,) + self._x.shape[1:], np.float32)
        out: list = [None] * n
        rows = []
        for i, (img, order, roi) in enumerate(frames):
            try:
                self.preprocess(img, order, roi, out=self._xb[len(rows):len(rows) + 1])
                rows.append(i)
            except FrameError as e:
                out[i] = e
            except Exception as e:  # OpenCV on a degenerate crop: this frame fails, the batch goes on
                out[i] = FrameError('inference_error', f'{type(e).__name__}: {str(e).splitlines()[0][:200]}')
        if not rows:
            return out
        y = self.session.run([self._out_name], {self._in_name: self._xb[:len(rows)]})[0]
        head = self.head  # read the reference once: the whole batch uses exactly one head
        for r, i in enumerate(rows):
            try:
                out[i] = self._predict(y[r], head, self._xb[r:r + 1])
            except FrameError as e:
                out[i] = e
        return out

    def _run(self, x: np.ndarray) -> Prediction:
        out = self.session.run([self._out_name], {self._in_name: x})[0][0]
        return self._predict(out, self.head, x)

    def _predict(self, out: np.ndarray, head: Head | None, x: np.ndarray) -> Prediction:
        if not np.isfinite(out).all():
            raise FrameError('non_finite', f'the {"model" if self.mode == "full" else "backbone"} gave '
                                           f'NaN/Inf outputs (input {_finite_summary(x)})')
        if self.mode == 'full':
            pred = Prediction(softmax(out.astype(np.float32)), None, None)
        else:
            pred = Prediction(softmax(head.logits(out)), out, head)
        if not np.isfinite(pred.probs).all():
            raise FrameError('non_finite', 'the head gave NaN/Inf scores (logits overflow)')
        return pred

    # -- batches ---------------------------------------------------------------------------------------
    def prepare_batch(self, images: np.ndarray, order: str = 'rgb') -> np.ndarray:
        """Images [N,H,W,3] uint8 (any size; resized if needed) -> normalised [N,3,h,w] float32."""
        h, w = self.input_hw
        if images.shape[1:3] != (h, w):
            images = np.stack([resize_to(im, h, w) for im in images])  # same rule as preprocess
        if order != self.color_order:
            images = images[..., ::-1]
        x = images.transpose(0, 3, 1, 2).astype(np.float32)
        x -= self._mean
        x *= self._inv_std
        return x

    def _run_batches(self, images: np.ndarray, order: str, batch_size: int) -> list[np.ndarray]:
        starts = range(0, len(images), batch_size)
        batches = (self.prepare_batch(images[i:i + batch_size], order) for i in starts)
        return [self.session.run([self._out_name], {self._in_name: x})[0] for x in batches]

    def features_batch(self, images: np.ndarray, order: str = 'rgb', batch_size: int = 256) -> np.ndarray:
        """Backbone features [N,D] for a batch of images (not available in full mode)."""
        if self.mode == 'full':
            raise EngineError('features are not available in deployment mode full')
        out = self._run_batches(images, order, batch_size)
        return np.concatenate(out) if out else np.zeros((0, self.bundle.feature_size), np.float32)

    def predict_batch(self, images: np.ndarray, order: str = 'rgb', batch_size: int = 256) -> np.ndarray:
        """Class probabilities [N,C] for a batch of images with the current head."""
        if self.mode == 'full':
            return softmax(np.concatenate(self._run_batches(images, order, batch_size)).astype(np.float32))
        return softmax(self.head.logits(self.features_batch(images, order, batch_size)))


def _finite_summary(x: np.ndarray) -> str:
    """Where the NaN/Inf came from, for the log line (only called on the rare non-finite frame)."""
    bad = int(x.size - np.isfinite(x).sum())
    return f'{bad} of {x.size} values non-finite' if bad else 'finite'


def limit_threads(n: int) -> None:
    """Bound numpy/BLAS threads of this process (call before heavy numpy work in worker processes)."""
    for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits  # optional

        threadpool_limits(n)
    except ImportError:
        pass
