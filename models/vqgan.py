"""VQGAN (taming-transformers ``VQModel``) written for this framework: encoder, decoder, vector quantiser.

Parameter names follow taming-transformers so that its checkpoints (e.g. ``vqgan_imagenet_f16_16384``:
``<name>.yaml`` + ``<name>.ckpt`` whose ``state_dict`` holds ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``,
``quant_conv.*``, ``post_quant_conv.*`` and the training-only ``loss.*``) load **strictly** once ``loss.*`` is dropped.
Nothing of taming is imported and nothing is downloaded (the LPIPS/discriminator ``loss`` module is never built).

    vqgan = load_vqgan("checkpoints/vqgan_imagenet_f16_16384.yaml", "checkpoints/vqgan_imagenet_f16_16384.ckpt")
    z = vqgan.encode(x * 2 - 1)                 # [B, e_dim, H/f, W/f], quantised
    img01 = vqgan.synth(z)                      # straight-through quantise + decode -> [B, 3, H, W] in [0, 1]

Architecture facts (taming ``taming/modules/diffusionmodules/model.py``): GroupNorm(32, eps 1e-6), swish,
ResnetBlock(norm1, conv1, norm2, conv2, nin_shortcut 1x1 when channels change), AttnBlock(norm, q, k, v, proj_out;
single-head over H*W), Downsample = pad (0,1,0,1) + 3x3 stride-2 conv, Upsample = nearest x2 + 3x3 conv.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

VQMODEL_TARGETS = ("taming.models.vqgan.VQModel",)


class VQGANConfigError(ValueError):
    """A yaml/ckpt that cannot describe or fill a VQModel; the message names the file and key."""


# ---------------------------------------------------------------------------------------------------------
# straight-through helpers (VQGAN-CLIP, spec styleclip_vqgan.md section 5.3)
# ---------------------------------------------------------------------------------------------------------
class _ReplaceGrad(torch.autograd.Function):
    """Forward value of ``x_forward``, gradient sent to ``x_backward`` (summed to its size)."""

    @staticmethod
    def forward(ctx, x_forward: torch.Tensor, x_backward: torch.Tensor) -> torch.Tensor:
        ctx.shape = x_backward.shape
        return x_forward.clone()

    @staticmethod
    def backward(ctx, grad_in: torch.Tensor):
        return None, grad_in.sum_to_size(ctx.shape)


def replace_grad(x_forward: torch.Tensor, x_backward: torch.Tensor) -> torch.Tensor:
    return _ReplaceGrad.apply(x_forward, x_backward)


class _ClampWithGrad(torch.autograd.Function):
    """clamp(x, lo, hi) whose backward passes grad only where it points back into the range
    (grad * (x - clamp(x)) >= 0), i.e. a descent step never pushes a clamped value further out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad_in: torch.Tensor):
        (x,) = ctx.saved_tensors
        keep = (grad_in * (x - x.clamp(ctx.lo, ctx.hi)) >= 0).to(grad_in.dtype)
        return grad_in * keep, None, None


def clamp_with_grad(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return _ClampWithGrad.apply(x, lo, hi)


def vector_quantize(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest codebook entry with a straight-through gradient.

    x: [..., e_dim] (channels last); codebook: [n_e, e_dim] -> [..., e_dim]."""
    d = x.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(1) - 2 * x @ codebook.t()  # [..., n_e]
    idx = d.argmin(-1)                                                                   # [...]
    x_q = F.one_hot(idx, codebook.shape[0]).to(x.dtype) @ codebook                       # [..., e_dim]
    return replace_grad(x_q, x)


# ---------------------------------------------------------------------------------------------------------
# building blocks (taming names)
# ---------------------------------------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    if channels % 32:
        raise VQGANConfigError(f"VQGAN channel count {channels} is not divisible by 32 (GroupNorm(32) as in "
                               f"taming); choose ddconfig.ch / ch_mult so every width is a multiple of 32.")
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1 convs for q/k/v/proj_out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)           # [B, HW, C]
        k = self.k(h).flatten(2).transpose(1, 2)           # [B, HW, C]
        v = self.v(h).flatten(2).transpose(1, 2)           # [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)      # softmax(q k^T / sqrt(C)) v, [B, HW, C]
        out = out.transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H/2, W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class DDConfig:
    """taming ``ddconfig`` (the keys of ``model.params.ddconfig`` in the yaml)."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 256
    double_z: bool = False
    resamp_with_conv: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # keys we accept but do not use (e.g. give_pre_end)


class Encoder(nn.Module):
    def __init__(self, cfg: DDConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level in range(self.num_resolutions):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, z_channels, H/f, W/f]
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: DDConfig):
        super().__init__()
        self.num_resolutions = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        stages: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)  # up[level] is the stage at that resolution level (taming order)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z_channels, h, w] -> [B, out_ch, h*f, w*f]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """taming ``VectorQuantizer2`` (no index remapping): ``embedding`` [n_e, e_dim]."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, e_dim, h, w] -> (z_q [B, e_dim, h, w] straight-through, indices [B, h, w])."""
        zc = z.movedim(1, -1)                                                    # [B, h, w, e_dim]
        w = self.embedding.weight
        d = zc.pow(2).sum(-1, keepdim=True) + w.pow(2).sum(1) - 2 * zc @ w.t()  # [B, h, w, n_e]
        idx = d.argmin(-1)
        zq = self.embedding(idx)                                                 # [B, h, w, e_dim]
        zq = zc + (zq - zc).detach()
        return zq.movedim(-1, 1), idx


class VQGAN(nn.Module):
    """taming ``VQModel`` without its training loss: ``encoder``, ``quant_conv``, ``quantize``,
    ``post_quant_conv``, ``decoder``."""

    def __init__(self, ddconfig: DDConfig, n_embed: int, embed_dim: int):
        super().__init__()
        self.ddconfig = ddconfig
        self.encoder = Encoder(ddconfig)
        self.decoder = Decoder(ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig.z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig.ch_mult) - 1)

    @property
    def codebook(self) -> torch.Tensor:  # [n_e, e_dim]
        return self.quantize.embedding.weight

    @property
    def e_dim(self) -> int:
        return self.quantize.e_dim

    @property
    def n_embed(self) -> int:
        return self.quantize.n_e

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> quantised z [B, e_dim, H/f, W/f]."""
        return self.quantize(self.quant_conv(self.encoder(x)))[0]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """[B, e_dim, h, w] -> image [B, 3, h*f, w*f] in ~[-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))

    def synth(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous z [B, e_dim, h, w] -> straight-through quantise, decode, [0, 1] with clamp_with_grad."""
        z_q = vector_quantize(z.movedim(1, 3), self.codebook).movedim(3, 1)
        return clamp_with_grad(self.decode(z_q).add(1).div(2), 0.0, 1.0)

    def z_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel min/max over the codebook, each [1, e_dim, 1, 1] (z is clamped to these every step)."""
        w = self.codebook
        return w.min(0).values.view(1, -1, 1, 1), w.max(0).values.view(1, -1, 1, 1)

    def random_z(self, toks_y: int, toks_x: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random codebook entries: [1, e_dim, toks_y, toks_x]."""
        idx = torch.randint(self.n_embed, (toks_y * toks_x,), generator=generator)
        z = self.codebook.detach().cpu()[idx].to(self.codebook.device)  # [toks_y*toks_x, e_dim]
        return z.view(toks_y, toks_x, self.e_dim).permute(2, 0, 1).unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------------------------------------
# taming yaml + ckpt loading
# ---------------------------------------------------------------------------------------------------------
_DDCONFIG_KEYS = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
                  "resolution", "z_channels", "double_z", "resamp_with_conv"}


def vqgan_from_config(cfg: dict[str, Any], source: str = "<dict>") -> VQGAN:
    """Build from a taming config dict ({'model': {'target': ..., 'params': {...}}}) or its ``params``."""
    model = cfg.get("model", cfg) if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise VQGANConfigError(f"{source}: expected a mapping with a 'model' key (taming config), got {type(cfg).__name__}.")
    target = model.get("target", VQMODEL_TARGETS[0])
    if target not in VQMODEL_TARGETS:
        raise VQGANConfigError(f"{source}: model.target {target!r} is not supported; only {VQMODEL_TARGETS} "
                               f"(Gumbel/EMA/Transformer models are not implemented).")
    params = model.get("params", model)
    for key in ("embed_dim", "n_embed", "ddconfig"):
        if key not in params:
            raise VQGANConfigError(f"{source}: missing key model.params.{key}.")
    if params.get("remap"):
        raise VQGANConfigError(f"{source}: model.params.remap={params['remap']!r} (index remapping) is not supported.")
    dd = dict(params["ddconfig"])
    for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels"):
        if key not in dd:
            raise VQGANConfigError(f"{source}: missing key model.params.ddconfig.{key}.")
    extra = {k: dd.pop(k) for k in list(dd) if k not in _DDCONFIG_KEYS}
    if dd.get("double_z"):
        raise VQGANConfigError(f"{source}: model.params.ddconfig.double_z=true is a KL autoencoder, not a VQGAN.")
    if dd.get("resamp_with_conv", True) is False:
        raise VQGANConfigError(f"{source}: ddconfig.resamp_with_conv=false is not supported.")
    ddc = DDConfig(**dd, extra=extra)
    ddc.ch_mult, ddc.attn_resolutions = tuple(ddc.ch_mult), tuple(ddc.attn_resolutions)
    return VQGAN(ddc, n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]))


def load_vqgan_config(path: str | Path) -> dict[str, Any]:
    from xclip.utils.io import read_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN config yaml not found: {path}")
    try:
        cfg = read_yaml(path, "VQGAN config yaml")
    except ValueError as e:
        raise VQGANConfigError(str(e)) from e
    return cfg


class _InertClass:
    """Stands in for a class that real taming checkpoints pickle by reference only (the Lightning callback class
    used as the key of ``callbacks``); it has no behaviour, so nothing of the original class runs."""


def _inert(qualified: str) -> tuple[type, str]:
    module, _, name = qualified.rpartition(".")
    return type(name, (_InertClass,), {"__module__": f"inert.{module}"}), qualified


def taming_safe_globals() -> list[Any]:
    """Exactly the non-tensor globals real taming ckpts pickle, for ``torch.load(weights_only=True)``.

    Everything else (os.system, builtins.eval, dotted names such as ``_rebuild_tensor.__builtins__``, any other
    class) is refused by torch's weights-only unpickler, which matches these names exactly.
    """
    import argparse

    from xclip.utils.io import numpy_safe_globals

    callbacks = [f"{pkg}.callbacks.{mod}.{cls}" for pkg in ("pytorch_lightning", "lightning.pytorch")
                 for mod, cls in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"))]
    return [*(_inert(c) for c in callbacks), argparse.Namespace, *numpy_safe_globals()]


def load_taming_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a taming ckpt, read with ``torch.load(weights_only=True)``; the only extra globals
    allowed are those real taming ckpts hold (``taming_safe_globals``: the Lightning ``ModelCheckpoint`` class
    as a callbacks key, an argparse Namespace of hparams, numpy scalars). Anything else is refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(taming_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        detail = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln or "global" in ln.lower()),
                      msg.splitlines()[0] if msg else "")
        raise VQGANConfigError(f"Could not read VQGAN checkpoint {path} (truncated, not a torch file, or it holds "
                               f"objects other than tensors): {type(e).__name__}: {detail[:400]}") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VQGANConfigError(f"{path} holds no tensor state dict (expected a dict with 'state_dict').")
    return state


def load_vqgan(config: str | Path | dict, ckpt: str | Path | None = None, device: str | torch.device = "cpu",
               ignore_prefixes: Sequence[str] = ("loss.",)) -> VQGAN:
    """Build from a taming yaml (or dict) and load a taming ckpt strictly (keys under ``ignore_prefixes``, i.e.
    the LPIPS/discriminator ``loss.*``, are dropped). The model is returned frozen in eval mode."""
    source = str(config) if not isinstance(config, dict) else "<config dict>"
    cfg = load_vqgan_config(config) if not isinstance(config, dict) else config
    model = vqgan_from_config(cfg, source)
    if ckpt is not None:
        state = load_taming_state_dict(ckpt)
        state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad_shape = [f"{k}: ckpt {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
                     for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
        if missing or unexpected or bad_shape:
            def _few(xs: list[str]) -> str:
                return ", ".join(xs[:5]) + (f" ... (+{len(xs) - 5})" if len(xs) > 5 else "")
            raise VQGANConfigError(
                f"VQGAN checkpoint {ckpt} does not match config {source}: "
                + "; ".join(p for p in (f"missing keys [{_few(missing)}]" if missing else "",
                                        f"unexpected keys [{_few(unexpected)}]" if unexpected else "",
                                        f"shape mismatches [{_few(bad_shape)}]" if bad_shape else "") if p))
        model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


def taming_yaml(ddconfig: dict[str, Any], n_embed: int, embed_dim: int) -> str:
    """A taming-style yaml text (with a lossconfig that is ignored here) for a given architecture."""
    import yaml

    cfg = {"model": {"base_learning_rate": 4.5e-6, "target": VQMODEL_TARGETS[0],
                     "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig,
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}
    return yaml.safe_dump(cfg, sort_keys=False)


TINY_DDCONFIG: dict[str, Any] = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3,
                                 "out_ch": 3, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1,
                                 "attn_resolutions": [], "dropout": 0.0}


def tiny_vqgan(n_embed: int = 64, embed_dim: int = 16, seed: int = 0, **dd_overrides: Any) -> VQGAN:
    """A random tiny VQGAN (f = 2 by default) for tests and CPU demos; codebook spread like a trained one."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = vqgan_from_config({"model": {"params": {"embed_dim": embed_dim, "n_embed": n_embed,
                                                        "ddconfig": {**TINY_DDCONFIG, **dd_overrides}}}})
    model.quantize.embedding.weight.data = torch.randn(n_embed, embed_dim, generator=g)
    return model.eval().requires_grad_(False)
