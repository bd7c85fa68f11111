"""Random stand-ins for insightface's face models, built in torch and exported to ONNX with the legacy TorchScript
exporter as the released files were: arcface_torch's IResNet (``w600k_r50.onnx`` is ``IResNet((3, 4, 14, 3))``;
tiny by default) and a small SCRFD-like detector with 5 landmarks (``det_10g.onnx``'s output layout: 9 outputs,
dynamic height and width). For ``tests/test_onnx_graph.py``, ``tests/test_face_similarity.py`` and
``python -m jaxvc.eval.bench``; torch is imported here, never by jaxvc itself."""
import torch
from torch import nn
from torch.nn import functional as F


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics and affines, random PReLU slopes: none of them is an identity after export."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                count = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(count, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(count, generator=generator))
                module.weight.copy_(1 + 0.2 * torch.randn(count, generator=generator))
                module.bias.copy_(0.1 * torch.randn(count, generator=generator))
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(0.25 + 0.1 * torch.randn(module.weight.shape, generator=generator))
    return model.eval()


def export(model, example, path, input_names, output_names, dynamic_axes, opset=11):
    torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                      output_names=output_names, dynamic_axes=dynamic_axes)
    return path


def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """insightface arcface_torch's iresnet block: BN, conv, BN, PReLU, conv (strided), BN, plus the shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), conv3x3(c_in, c_out)
        self.bn2, self.prelu = nn.BatchNorm2d(c_out), nn.PReLU(c_out)
        self.conv2, self.bn3 = conv3x3(c_out, c_out, stride), nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch's ``iresnet``: a 3x3 stem at ``widths[0]``, four stages of ``layers`` blocks (the first of each
    strided, 112 -> 7), BN, dropout, a linear layer to ``features`` and a 1-D batch norm. ``layers=(3, 4, 14, 3)``,
    ``widths=(64, 64, 128, 256, 512)`` is IResNet-50; the default is a tiny one for tests."""

    def __init__(self, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16, 24), features=512):
        super().__init__()
        self.conv1, self.bn1, self.prelu = conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0])
        blocks = []
        for count, c_in, c_out in zip(layers, widths[:-1], widths[1:]):
            blocks += [IBasicBlock(c_in, c_out, 2)] + [IBasicBlock(c_out, c_out, 1) for _ in range(count - 1)]
        self.layers = nn.Sequential(*blocks)  # (N, widths[-1], 7, 7)
        self.bn2, self.dropout = nn.BatchNorm2d(widths[-1]), nn.Dropout(0.4)
        self.fc = nn.Linear(widths[-1] * 7 * 7, features)
        self.features = nn.BatchNorm1d(features)

    def forward(self, x):
        x = self.bn2(self.layers(self.prelu(self.bn1(self.conv1(x)))))
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))


class DownBlock(nn.Module):
    """A residual block with a strided conv and an AvgPool + 1x1 conv shortcut (ResNet-D, as SCRFD's backbones)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(conv3x3(c_in, c_out, 2), nn.BatchNorm2d(c_out), nn.ReLU(),
                                  conv3x3(c_out, c_out), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                      nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class TinySCRFD(nn.Module):
    """Backbone to strides 8/16/32, FPN top-down path, per-level heads: 2 anchors per location, scores (sigmoid),
    bbox distances (times a learned scale) and 10 keypoint values, flattened as mmdet's SCRFD export does."""

    def __init__(self, width=16, anchors=2):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, 8, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))  # stride 4
        self.stages = nn.ModuleList([DownBlock(8, 16), DownBlock(16, 24), DownBlock(24, 32)])  # strides 8, 16, 32
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in (16, 24, 32)])
        self.fpn = nn.ModuleList([nn.Conv2d(width, width, 3, 1, 1) for _ in range(3)])
        self.shared = nn.ModuleList([nn.Sequential(conv3x3(width, width), nn.BatchNorm2d(width), nn.ReLU())
                                     for _ in range(3)])
        self.cls = nn.ModuleList([nn.Conv2d(width, anchors, 3, 1, 1) for _ in range(3)])
        self.reg = nn.ModuleList([nn.Conv2d(width, anchors * 4, 3, 1, 1) for _ in range(3)])
        self.kps = nn.ModuleList([nn.Conv2d(width, anchors * 10, 3, 1, 1) for _ in range(3)])
        self.scales = nn.Parameter(torch.tensor([1.0, 1.3, 0.7]))

    def forward(self, x):
        features, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        laterals[1] = laterals[1] + F.interpolate(laterals[2], scale_factor=2, mode="nearest")
        laterals[0] = laterals[0] + F.interpolate(laterals[1], size=laterals[0].shape[2:], mode="nearest")  # mmdet
        scores, boxes, points = [], [], []
        for level, lateral in enumerate(laterals):
            y = self.shared[level](self.fpn[level](lateral))
            scores.append(self.cls[level](y).sigmoid().permute(0, 2, 3, 1).reshape(-1, 1))
            boxes.append((self.reg[level](y) * self.scales[level]).permute(0, 2, 3, 1).reshape(-1, 4))
            points.append(self.kps[level](y).permute(0, 2, 3, 1).reshape(-1, 10))
        return (*scores, *boxes, *points)


