"""Full fine-tuning of an exported student (ONNX backbone + linear head) in torch.

The adaptation benchmark's oracle: every weight of the deployed student (not only its head) trained on
target-labelled frames. It starts from the exported ONNX graph itself, so it fine-tunes exactly the
network the robot runs (BatchNorm already folded into the convolutions), whatever architecture exported
it; :class:`OnnxModule` interprets the graph with torch ops and makes every float initializer a
parameter. The supported ops cover the exported students (seed_cnn, mobilenet-style blocks) and the toy
bundles; any other op raises :class:`FinetuneError` naming it.

Workstation code (needs torch); the robot never imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..bundle import Head


class FinetuneError(ValueError):
    pass


def _pads2d(at: dict, what: str) -> tuple[int, int]:
    if at.get('auto_pad', b'NOTSET') not in (b'NOTSET', 'NOTSET'):
        raise FinetuneError(f'{what}: auto_pad is not supported')
    p = list(at.get('pads', [0, 0, 0, 0]))
    if p[:2] != p[2:]:
        raise FinetuneError(f'{what}: asymmetric pads {p} are not supported')
    return int(p[0]), int(p[1])


class OnnxModule(torch.nn.Module):
    """An ONNX feature graph + a linear head as a trainable torch module (logits out)."""

    OPS = ('Conv', 'Relu', 'MaxPool', 'AveragePool', 'GlobalAveragePool', 'Flatten', 'Gemm', 'MatMul',
           'Add', 'Sub', 'Mul', 'Div', 'Clip', 'Sigmoid', 'HardSigmoid', 'HardSwish', 'Reshape', 'Identity',
           'Constant', 'BatchNormalization')

    def __init__(self, backbone_path: str | Path, head: Head):
        super().__init__()
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(backbone_path))
        g = model.graph
        self.nodes = list(g.node)
        bad = sorted({n.op_type for n in self.nodes} - set(self.OPS))
        if bad:
            raise FinetuneError(f'{backbone_path}: ops {bad} are not supported for fine-tuning')
        self.params = torch.nn.ParameterDict()
        self.key: dict[str, str] = {}
        self.consts: dict[str, torch.Tensor] = {}
        # BatchNormalization runs in inference form: its running mean/var stay fixed, scale/bias train
        frozen = {i for n in self.nodes if n.op_type == 'BatchNormalization' for i in n.input[3:5]}
        for init in g.initializer:
            a = numpy_helper.to_array(init).copy()
            if a.dtype == np.float32 and init.name not in frozen:
                k = f'w{len(self.key)}'
                self.key[init.name] = k
                self.params[k] = torch.nn.Parameter(torch.from_numpy(a))
            else:  # shapes, axes: constants
                self.consts[init.name] = torch.from_numpy(a)
        self.attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes]
        for n, at in zip(self.nodes, self.attrs):
            if n.op_type == 'Constant':
                self.consts[n.output[0]] = torch.from_numpy(numpy_helper.to_array(at['value']).copy())
        self.input_name = g.input[0].name
        self.output_name = g.output[0].name
        self.head = torch.nn.Linear(head.feature_size, head.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.array(head.weight, np.float32)))  # a copy: heads are
            self.head.bias.copy_(torch.from_numpy(np.array(head.bias, np.float32)))  # read-only arrays

    def _value(self, env: dict, name: str) -> torch.Tensor:
        if name in self.key:
            return self.params[self.key[name]]
        if name in self.consts:
            return self.consts[name]
        return env[name]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for n, at in zip(self.nodes, self.attrs):
            t = n.op_type
            if t == 'Constant':
                continue
            a = [self._value(env, i) if i else None for i in n.input]
            if t == 'Conv':
                y = F.conv2d(a[0], a[1], a[2] if len(a) > 2 else None,
                             stride=tuple(at.get('strides', (1, 1))),
                             padding=_pads2d(at, n.name), dilation=tuple(at.get('dilations', (1, 1))),
                             groups=int(at.get('group', 1)))
            elif t in ('MaxPool', 'AveragePool'):
                pool = F.max_pool2d if t == 'MaxPool' else F.avg_pool2d
                if at.get('ceil_mode', 0):
                    raise FinetuneError(f'{n.name}: ceil_mode pooling is not supported')
                y = pool(a[0], tuple(at['kernel_shape']), tuple(at.get('strides', at['kernel_shape'])),
                         _pads2d(at, n.name))
            elif t == 'GlobalAveragePool':
                y = a[0].mean(dim=(2, 3), keepdim=True)
            elif t == 'Flatten':
                y = torch.flatten(a[0], int(at.get('axis', 1)))
            elif t == 'Gemm':
                m1 = a[0].t() if at.get('transA', 0) else a[0]
                m2 = a[1].t() if at.get('transB', 0) else a[1]
                y = float(at.get('alpha', 1.0)) * (m1 @ m2)
                if len(a) > 2 and a[2] is not None:
                    y = y + float(at.get('beta', 1.0)) * a[2]
            elif t == 'MatMul':
                y = a[0] @ a[1]
            elif t in ('Add', 'Sub', 'Mul', 'Div'):
                y = {'Add': torch.add, 'Sub': torch.sub, 'Mul': torch.mul, 'Div': torch.div}[t](a[0], a[1])
            elif t == 'BatchNormalization':
                if at.get('training_mode', 0):
                    raise FinetuneError(f'{n.name}: training-mode BatchNormalization is not supported')
                y = F.batch_norm(a[0], a[3], a[4], a[1], a[2], training=False,
                                 eps=float(at.get('epsilon', 1e-5)))
            elif t == 'Relu':
                y = F.relu(a[0])
            elif t == 'Clip':
                lo = float(a[1]) if len(a) > 1 and a[1] is not None else at.get('min')
                hi = float(a[2]) if len(a) > 2 and a[2] is not None else at.get('max')
                y = torch.clamp(a[0], lo, hi)
            elif t == 'Sigmoid':
                y = torch.sigmoid(a[0])
            elif t == 'HardSigmoid':
                y = torch.clamp(float(at.get('alpha', 0.2)) * a[0] + float(at.get('beta', 0.5)), 0.0, 1.0)
            elif t == 'HardSwish':
                y = F.hardswish(a[0])
            elif t == 'Reshape':
                shape = [int(v) for v in a[1].tolist()]
                shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
                y = a[0].reshape(shape)
            else:  # Identity
                y = a[0]
            env[n.output[0]] = y
        return env[self.output_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Top-1 class indices for normalised inputs ``[N,3,H,W]``."""
        was = self.training
        self.eval()
        out = [self(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32))).argmax(1).numpy()
               for i in range(0, len(x), batch_size)]
        self.train(was)
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def finetune_all(backbone_path: str | Path, head: Head, x: np.ndarray, y: np.ndarray, epochs: int = 15,
                 lr: float = 1e-3, batch_size: int = 128, seed: int = 0, threads: int | None = None,
                 progress: bool = False) -> OnnxModule:
    """Fine-tune every weight of backbone + head on normalised inputs ``x`` [N,3,H,W] with labels ``y``.

    Adam, cosine learning-rate decay to 0 over ``epochs``, cross-entropy, no augmentation, a fixed seed.
    Returns the trained module in eval mode.
    """
    if len(x) != len(y) or len(x) == 0:
        raise FinetuneError(f'need as many labels as inputs (> 0), got {len(x)} inputs, {len(y)} labels')
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    net = OnnxModule(backbone_path, head)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = max(1, int(epochs) * int(np.ceil(len(x) / batch_size)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    gen = torch.Generator().manual_seed(seed)
    epochs_iter = range(int(epochs))
    if progress:
        from tqdm import tqdm

        epochs_iter = tqdm(epochs_iter, desc='fine-tune (all weights)', unit='epoch')
    net.train()
    for _ in epochs_iter:
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            ix = order[i:i + batch_size]
            loss = F.cross_entropy(net(xt[ix]), yt[ix])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net
