"""TGANv2's UCF-101 C3D (``C3DVersion1``) in torch, the way a PyTorch user runs the video Inception Score (StyleGAN-V
ships it as TorchScript): for ``python -m jaxvc.eval.bench``, against ``jaxvc.models.c3d.C3D`` on the same weights.
chainer's ``cover_all`` pooling is torch's ``ceil_mode=True`` here (no padding); ``Linear`` flattens (C, T, H, W) as
chainer's does. The keys (``conv1a.weight`` ...) are the ones ``jaxvc.convert.c3d`` reads from safetensors. torch is
imported here, never by jaxvc itself."""
import torch
from torch import nn

from jaxvc.models.c3d import CONV_LAYOUT, POOLS


class TorchC3D(nn.Module):
    def __init__(self, num_classes: int = 101):
        super().__init__()
        channels = 3
        for name, features in CONV_LAYOUT:
            self.add_module(name, nn.Conv3d(channels, features, 3, padding=1))
            channels = features
        self.fc6, self.fc7, self.fc8 = nn.Linear(8192, 4096), nn.Linear(4096, 4096), nn.Linear(4096, num_classes)

    def forward(self, clips):  # (B, 3, 16, 112, 112), mean-subtracted BGR -> fc8 logits (B, classes)
        x = clips
        for name, _ in CONV_LAYOUT:
            x = torch.relu(getattr(self, name)(x))
            if name in POOLS:
                window = POOLS[name][1]
                x = nn.functional.max_pool3d(x, window, window, ceil_mode=True)
        x = torch.relu(self.fc6(x.flatten(1)))
        return self.fc8(torch.relu(self.fc7(x)))  # dropout: the identity when evaluating


def random_c3d(seed: int = 0) -> TorchC3D:
    """He-scaled random weights, the first layer scaled for inputs of about +-100 (as the mean-subtracted clips)."""
    torch.manual_seed(seed)
    model = TorchC3D()
    with torch.no_grad():
        for name, module in model.named_children():
            fan_in = module.weight[0].numel()
            module.weight.normal_(0, (2.0 / fan_in) ** 0.5 * (0.02 if name == "conv1a" else 1.0))
            module.bias.normal_(0, 0.05)
    return model.eval()
