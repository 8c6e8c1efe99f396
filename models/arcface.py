"""IR-SE50 ArcFace backbone whose state dict matches ``model_ir_se50.pth`` (TreB1eN / StyleCLIP ``Backbone``).

Spec: reference/styleclip_vqgan.md §1.3. Module names follow the anchor so the file loads strictly:
``input_layer.{0,1,2}``, ``body.{i}.shortcut_layer``, ``body.{i}.res_layer.{0..5}`` (SE as ``fc1``/``fc2``),
``output_layer.{0,3,4}``.

    net = load_arcface("model_ir_se50.pth")       # strict
    loss = IDLoss(net)(edited, source)            # both [B, 3, H, W] in the generator's [-1, 1]
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xclip.utils.io import safe_torch_load

# (in_channel, depth, units) per stage for 50 layers; the first unit of each stage has stride 2
IR50_STAGES: list[tuple[int, int, int]] = [(64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)]


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class SEModule(nn.Module):
    """Squeeze-excitation with 1x1 convs (no bias), reduction 16."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """BN, conv3x3, PReLU, conv3x3 (stride), BN, SE; shortcut MaxPool(1, s) or conv1x1+BN."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SEModule(depth, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """IR-SE50 for 112x112 faces -> L2-normalised 512-d embedding.

    ``stages`` can be shrunk for tests; the default is the real 3/4/14/3 layout.
    """

    def __init__(self, input_size: int = 112, drop_ratio: float = 0.6,
                 stages: list[tuple[int, int, int]] | None = None, embed_dim: int = 512):
        super().__init__()
        if input_size not in (112, 224):
            raise ValueError(f"IR-SE input_size must be 112 or 224, got {input_size}")
        stages = stages or IR50_STAGES
        self.input_size = input_size
        self.input_layer = nn.Sequential(nn.Conv2d(3, stages[0][0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(stages[0][0]), nn.PReLU(stages[0][0]))
        units = []
        for cin, depth, n in stages:
            units.append(BottleneckIRSE(cin, depth, 2))
            units += [BottleneckIRSE(depth, depth, 1) for _ in range(n - 1)]
        self.body = nn.Sequential(*units)
        last = stages[-1][1]
        spatial = input_size // 16  # 7 at 112 px
        self.output_layer = nn.Sequential(nn.BatchNorm2d(last), nn.Dropout(drop_ratio), Flatten(),
                                          nn.Linear(last * spatial * spatial, embed_dim), nn.BatchNorm1d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 112, 112] -> [B, 512], unit norm."""
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def load_arcface(path: str | Path, device: str | torch.device = "cpu") -> IRSE50:
    """Strictly load ``model_ir_se50.pth`` (bare state dict, optionally under 'state_dict'), frozen, eval."""
    state = safe_torch_load(path, "ArcFace IR-SE50 weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RuntimeError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    for key in [k for k in state if k.endswith(".running_var")]:  # files from PyTorch < 0.4.1 lack this buffer
        state.setdefault(key[: -len("running_var")] + "num_batches_tracked", torch.zeros((), dtype=torch.long))
    net = IRSE50()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path} is not an IR-SE50 (model_ir_se50.pth) state dict: {str(e)[:600]}") from e
    return freeze(net).to(device)


def freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def arcface_preprocess(images: torch.Tensor, input_size: int = 112) -> torch.Tensor:
    """StyleCLIP IDLoss crop: pool to 256, crop rows 35:223 / cols 32:220, pool to 112. [-1, 1] kept as is."""
    if images.shape[-1] != 256 or images.shape[-2] != 256:
        images = F.adaptive_avg_pool2d(images, 256)
    images = images[:, :, 35:223, 32:220]  # [B, 3, 188, 188]
    return F.adaptive_avg_pool2d(images, input_size)


class IDLoss(nn.Module):
    """mean_b (1 - <f(edited_b), f(source_b).detach()>) with f = IR-SE50 on the StyleCLIP face crop."""

    def __init__(self, net: IRSE50):
        super().__init__()
        self.net = freeze(net)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()  # BN/Dropout always in eval mode
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(arcface_preprocess(images, self.net.input_size))

    def forward(self, edited: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f_src = self.embed(source)
        f_edit = self.embed(edited)
        return (1 - (f_edit * f_src).sum(dim=1)).mean()
