"""A tiny, real model bundle for tests, benchmarks of the node plumbing, and examples (needs ``onnx``).

The toy backbone is a real ONNX graph: global average pool -> linear (3 -> D) -> ReLU, so the features
encode the mean colour of the (ROI of the) frame; the toy head separates ``red``, ``green`` and
``blue`` frames. :func:`toy_frames` draws noisy frames of a class, optionally through a colour shift
under which the bundle head is poor, so adaptation has something real to fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import Head, write_manifest

TOY_CLASSES = ('red', 'green', 'blue')
TOY_FEATURES = 8
# feature = relu(M.T @ mean_rgb + b); columns: r, g, b, r-g, g-b, b-r, r+g-b, 1-(r+g+b)/3
_M = np.array([[1, 0, 0, 1, 0, -1, 1, -1 / 3],
               [0, 1, 0, -1, 1, 0, 1, -1 / 3],
               [0, 0, 1, 0, -1, 1, -1, -1 / 3]], np.float32)
_B = np.array([0, 0, 0, 0, 0, 0, 0, 1], np.float32)
_W = np.array([[6, -2, -2, 2, 0, 0, 0, 0],
               [-2, 6, -2, 0, 2, 0, 0, 0],
               [-2, -2, 6, 0, 0, 2, 0, 0]], np.float32)


def _backbone_graph(h: int, w: int, with_head: Head | None = None, name: str = 'toy', conv: bool = False):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if conv:  # the same function with a 1x1 convolution first (a conv stem, for test-time normalisation)
        nodes = [
            helper.make_node('Conv', ['image', 'CW', 'B'], ['stem'], kernel_shape=[1, 1]),
            helper.make_node('GlobalAveragePool', ['stem'], ['pooled']),
            helper.make_node('Flatten', ['pooled'], ['pre'], axis=1),
            helper.make_node('Relu', ['pre'], ['features']),
        ]
        inits = [numpy_helper.from_array(np.ascontiguousarray(_M.T).reshape(TOY_FEATURES, 3, 1, 1), 'CW'),
                 numpy_helper.from_array(_B, 'B')]
    else:
        nodes = [
            helper.make_node('GlobalAveragePool', ['image'], ['pooled']),
            helper.make_node('Flatten', ['pooled'], ['flat'], axis=1),
            helper.make_node('MatMul', ['flat', 'M'], ['lin']),
            helper.make_node('Add', ['lin', 'B'], ['pre']),
            helper.make_node('Relu', ['pre'], ['features']),
        ]
        inits = [numpy_helper.from_array(_M, 'M'), numpy_helper.from_array(_B, 'B')]
    out_name, out_dim = 'features', TOY_FEATURES
    if with_head is not None:
        nodes.append(helper.make_node('Gemm', ['features', 'HW', 'HB'], ['logits'], transB=1))
        inits += [numpy_helper.from_array(np.asarray(with_head.weight), 'HW'),
                  numpy_helper.from_array(np.asarray(with_head.bias), 'HB')]
        out_name, out_dim = 'logits', with_head.num_classes
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info('image', TensorProto.FLOAT, ['N', 3, h, w])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ['N', out_dim])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def toy_head(scale: float = 1.0, permute: tuple[int, ...] | None = None, version: int = 0) -> Head:
    """The toy bundle's head; ``permute`` reorders its rows (a deliberately wrong head for tests)."""
    w = _W * scale
    if permute is not None:
        w = w[list(permute)]
    return Head(w, np.zeros(len(TOY_CLASSES), np.float32), TOY_CLASSES, version)


def make_toy_bundle(root: str | Path, size: int = 16, with_full: bool = True, with_anchor: bool = True,
                    head: Head | None = None, name: str = 'toy', conv: bool = False) -> Path:
    """Write a complete, valid toy bundle to ``root`` and return its path.

    ``conv``: the backbone starts with a 1x1 convolution (same features), so test-time normalisation
    (:mod:`edge_tl_ros.ttn`) has a conv output to re-normalise.
    """
    import onnx

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    head = head or toy_head()
    onnx.save(_backbone_graph(size, size, name=name, conv=conv), str(root / 'backbone.onnx'))
    head.save(root / 'head.npz')
    files = {'backbone': 'backbone.onnx', 'head': 'head.npz'}
    if with_full:
        onnx.save(_backbone_graph(size, size, with_head=head, name=name + '_full', conv=conv),
                  str(root / 'full.onnx'))
        files['full'] = 'full.onnx'
    if with_anchor:
        rng = np.random.default_rng(0)
        imgs, labels = toy_frames(rng, 60, size=size)
        feats = toy_features(imgs)
        from .atomic import atomic_write_bytes, npz_bytes

        atomic_write_bytes(root / 'anchor.npz', npz_bytes(features=feats, labels=labels.astype(np.int64),
                                                         images=imgs))
        files['anchor'] = 'anchor.npz'
    manifest = {
        'format_version': 1,
        'name': name,
        'task': 'classification',
        'architecture': 'toy_mean_colour',
        'class_names': list(TOY_CLASSES),
        'input': {'height': size, 'width': size, 'color_order': 'rgb', 'layout': 'NCHW',
                  'mean': [0.0, 0.0, 0.0], 'std': [255.0, 255.0, 255.0]},
        'feature_size': TOY_FEATURES,
        'files': files,
        'metrics': {},
        'created_by': 'edge_tl_ros.toy.make_toy_bundle',
    }
    write_manifest(root, manifest)
    return root


# colour shift under which the toy head is poor: red looks green-ish, green blue-ish, blue red-ish
SHIFT = np.array([[0.35, 0.0, 0.65],
                  [0.65, 0.35, 0.0],
                  [0.0, 0.65, 0.35]], np.float32)


def toy_frames(rng: np.random.Generator, n: int, size: int = 16, shifted: bool = False,
               labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB uint8 frames [n,size,size,3] of random toy classes (or the given ``labels``)."""
    if labels is None:
        labels = rng.integers(0, len(TOY_CLASSES), n)
    base = np.eye(3, dtype=np.float32)[labels] * rng.uniform(0.55, 0.95, (n, 1))
    base += rng.uniform(0, 0.25, (n, 3))
    if shifted:
        base = base @ SHIFT.T
    pix = base[:, None, None, :] + rng.normal(0, 0.05, (n, size, size, 3))
    return (np.clip(pix, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64)


def toy_features(images_rgb: np.ndarray) -> np.ndarray:
    """The toy backbone computed in numpy (for anchor sets and cross-checks)."""
    mean = images_rgb.reshape(len(images_rgb), -1, 3).mean(axis=1) / 255.0
    return np.maximum(mean.astype(np.float32) @ _M + _B, 0).astype(np.float32)
