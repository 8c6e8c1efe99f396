"""StyleGAN2 generator whose state dict matches rosinality's ``Generator`` (``g_ema``) key for key.

Written for this project from the architecture description (spec: reference/styleclip_vqgan.md §1.1). Pure
PyTorch ops (upfirdn2d, fused leaky ReLU), so it runs on CPU and GPU. Besides rosinality's W / W+ path it
exposes StyleSpace S (one modulation vector per modulated conv, ToRGBs included: 26 tensors at 1024 px).

    g = load_generator("stylegan2-ffhq-config-f.pt", size=1024)        # real weights (strict load)
    img, w_plus = g([z], truncation=0.7, truncation_latent=g.mean_latent(4096), return_latents=True)
    s = g.w_to_s(w_plus)                                                 # list of [B, C_l]
    img = g.synthesize_s(s, randomize_noise=False)
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


class GeneratorCheckpointError(RuntimeError):
    """A generator checkpoint that does not fit the requested architecture."""


# ---- ops ---------------------------------------------------------------------------------------------
def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """1-D taps -> normalised 2-D FIR kernel [K, K] (outer product, sums to 1)."""
    t = torch.tensor(list(k), dtype=torch.float32)
    if t.ndim == 1:
        t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample (zero insertion), pad, FIR-filter, downsample. x [B, C, H, W]; kernel [kh, kw].

    ``pad = (p0, p1)`` is applied before/after on both axes; negative values crop.
    """
    b, c, h, w = x.shape
    p0, p1 = pad
    if up > 1:  # put up-1 zeros after every sample on both axes
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    hh, ww = x.shape[-2:]
    x = x[:, :, max(-p0, 0): hh - max(-p1, 0), max(-p0, 0): ww - max(-p1, 0)]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    x = F.conv2d(x, weight, groups=c)  # [B, C, H', W'] depthwise
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None, dim: int = 1,
                     negative_slope: float = 0.2, scale: float = SQRT2) -> torch.Tensor:
    """leaky_relu(x + b, 0.2) * sqrt(2), with ``bias`` broadcast along ``dim`` of x."""
    if bias is not None:
        shape = [1] * x.ndim
        shape[dim] = bias.shape[0]
        x = x + bias.view(shape)
    return F.leaky_relu(x, negative_slope) * scale


# ---- layers (module/parameter names follow rosinality so state dicts load) ------------------------------
class PixelNorm(nn.Module):
    """x * rsqrt(mean(x^2, dim) + 1e-8). dim=1 is the features of a [B, D] input."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=self.dim, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Equalised-lr linear layer: weight stored as randn/lr_mul, scaled by lr_mul/sqrt(in) at run time.

    ``activation="fused_lrelu"`` adds the bias inside the leaky ReLU; it acts on the last dimension, so
    [B, D] and [B, k, D] inputs both work.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))  # [out, in]
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        if activation not in (None, "fused_lrelu"):
            raise ValueError(f"EqualLinear activation must be None or 'fused_lrelu', got {activation!r}")
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias, dim=-1)
        return F.linear(x, self.weight * self.scale, bias)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor ** 2
        self.register_buffer("kernel", k)  # [K, K], part of rosinality's state dict
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, kernel: Sequence[float], factor: int = 2):
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel) * factor ** 2
        self.register_buffer("kernel", k)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Weight-modulated conv (optional demodulation and 2x transposed-conv upsampling + blur).

    ``forward(x, s)`` takes the *style-space* vector s [B, in_channel] (i.e. ``modulation(w)``) so that the
    generator can run from W+ or from S alike.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1),
                 fused: bool = True):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate, self.fused = upsample, demodulate, fused
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b, cin, h, w = x.shape  # s: [B, cin]
        if self.fused:
            weight = self.scale * self.weight * s.view(b, 1, cin, 1, 1)  # [B, out, in, k, k]
            if self.demodulate:
                weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, -1, 1, 1, 1)
            k = self.kernel_size
            xg = x.reshape(1, b * cin, h, w)
            if self.upsample:
                wt = weight.transpose(1, 2).reshape(b * cin, self.out_channel, k, k)
                out = F.conv_transpose2d(xg, wt, padding=0, stride=2, groups=b)
                out = self.blur(out.view(b, self.out_channel, *out.shape[-2:]))
            else:
                out = F.conv2d(xg, weight.reshape(b * self.out_channel, cin, k, k), padding=self.padding, groups=b)
                out = out.view(b, self.out_channel, *out.shape[-2:])
            return out
        # unfused: modulate activations, shared weight, demodulate the output
        weight = self.scale * self.weight.squeeze(0)  # [out, in, k, k]
        if self.demodulate:
            dcoef = torch.rsqrt((weight.unsqueeze(0) * s.view(b, 1, cin, 1, 1)).pow(2).sum([2, 3, 4]) + 1e-8)
        x = x * s.view(b, cin, 1, 1)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), padding=0, stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            out = out * dcoef.view(b, -1, 1, 1)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # learned noise strength

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, *x.shape[-2:]).normal_()
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, dim=1)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1), fused: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel, fused=fused)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, s: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, s), noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), fused: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False, fused=fused)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, s: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, s) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# ---- generator -----------------------------------------------------------------------------------------
def channel_table(channel_multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """Feature maps per resolution (config-f rule), optionally capped by ``channel_max`` for tiny models."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {r: min(c, channel_max) for r, c in base.items()}


class Generator(nn.Module):
    """rosinality-compatible StyleGAN2 generator with W, W+ and StyleSpace inputs."""

    def __init__(self, size: int = 1024, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), lr_mlp: float = 0.01, channel_max: int = 512,
                 fused: bool = True):
        super().__init__()
        log_size = math.log2(size) if size > 0 else -1
        if size < 8 or size > 1024 or log_size != int(log_size):
            raise ValueError(f"Generator size must be a power of two in [8, 1024], got {size}")
        self.size, self.style_dim, self.n_mlp = size, style_dim, n_mlp
        self.log_size = int(log_size)
        self.num_layers = (self.log_size - 2) * 2 + 1  # noise buffers
        self.n_latent = self.log_size * 2 - 2  # rows of W+
        self.channels = channel_table(channel_multiplier, channel_max)

        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp,
                                                              activation="fused_lrelu") for _ in range(n_mlp)])
        c4 = self.channels[4]
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, 3, style_dim, blur_kernel=blur_kernel, fused=fused)
        self.to_rgb1 = ToRGB(c4, style_dim, upsample=False, fused=fused)
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty, as in rosinality (kept for name parity)
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        cin = c4
        for i in range(3, self.log_size + 1):
            cout = self.channels[2 ** i]
            self.convs.append(StyledConv(cin, cout, 3, style_dim, upsample=True, blur_kernel=blur_kernel, fused=fused))
            self.convs.append(StyledConv(cout, cout, 3, style_dim, blur_kernel=blur_kernel, fused=fused))
            self.to_rgbs.append(ToRGB(cout, style_dim, blur_kernel=blur_kernel, fused=fused))
            cin = cout

    # ---- style space bookkeeping -------------------------------------------------------------------
    def modulated_convs(self) -> list[ModulatedConv2d]:
        """Modulated convs in StyleSpace order: conv1, to_rgb1, then (up-conv, conv, to_rgb) per resolution."""
        mods = [self.conv1.conv, self.to_rgb1.conv]
        for k, rgb in enumerate(self.to_rgbs):
            mods += [self.convs[2 * k].conv, self.convs[2 * k + 1].conv, rgb.conv]
        return mods

    @property
    def s_dims(self) -> list[int]:
        """Channels of each S tensor ([512]*15 + [256]*3 + [128]*3 + [64]*3 + [32]*2 at 1024 px)."""
        return [m.in_channel for m in self.modulated_convs()]

    @property
    def torgb_s_indices(self) -> list[int]:
        return [1] + [4 + 3 * k for k in range(len(self.to_rgbs))]

    def s_resolutions(self) -> list[int]:
        """Output resolution of each S layer."""
        res = [4, 4]
        for i in range(3, self.log_size + 1):
            res += [2 ** i] * 3
        return res

    @staticmethod
    def s_to_w_index(j: int) -> int:
        """Which W+ row feeds S layer j."""
        return j if j < 2 else 2 * ((j - 2) // 3) + 1 + (j - 2) % 3

    def w_to_s(self, w_plus: torch.Tensor) -> list[torch.Tensor]:
        """W+ [B, n_latent, style_dim] -> S: list of [B, C_j]."""
        self._check_w_plus(w_plus)
        return [m.modulation(w_plus[:, self.s_to_w_index(j)]) for j, m in enumerate(self.modulated_convs())]

    # ---- sampling helpers --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.input.input.device

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean of style(z) over n samples -> [1, style_dim]."""
        z = torch.randn(n, self.style_dim, generator=generator).to(self.device)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.style(z)

    def make_noise(self) -> list[torch.Tensor]:
        return [torch.randn_like(getattr(self.noises, f"noise_{i}")) for i in range(self.num_layers)]

    def fixed_noise(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def _check_w_plus(self, w: torch.Tensor) -> None:
        if w.ndim != 3 or w.shape[1:] != (self.n_latent, self.style_dim):
            raise ValueError(f"W+ latent must have shape (B, {self.n_latent}, {self.style_dim}) for a {self.size} px "
                             f"generator, got {tuple(w.shape)}")

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, styles, return_latents: bool = False, inject_index: int | None = None,
                truncation: float = 1.0, truncation_latent: torch.Tensor | None = None,
                input_is_latent: bool = False, input_is_stylespace: bool = False,
                noise: Sequence[torch.Tensor | None] | None = None, randomize_noise: bool = True,
                return_styles: bool = False):
        """rosinality's forward. ``styles``: list of z [B, D] (or W [B, D] / W+ [B, n_latent, D] with
        ``input_is_latent``), or with ``input_is_stylespace`` the S list itself.

        Returns ``(image [B, 3, size, size] in ~[-1, 1], W+ [B, n_latent, D] or None)``, plus the S list as a
        third element when ``return_styles``.
        """
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else self.fixed_noise()
        if input_is_stylespace:
            s = list(styles)
            image = self._synthesize(s, noise)
            return (image, None, s) if return_styles else (image, None)
        if isinstance(styles, torch.Tensor):
            styles = [styles]
        if not input_is_latent:
            styles = [self.style(z) for z in styles]
        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (e.g. generator.mean_latent(4096))")
            styles = [truncation_latent + truncation * (st - truncation_latent) for st in styles]
        if len(styles) < 2:
            latent = styles[0] if styles[0].ndim == 3 else styles[0].unsqueeze(1).repeat(1, self.n_latent, 1)
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            latent = torch.cat([styles[0].unsqueeze(1).repeat(1, inject_index, 1),
                                styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)], 1)
        self._check_w_plus(latent)
        s = self.w_to_s(latent)
        image = self._synthesize(s, noise)
        out_latent = latent if return_latents else None
        return (image, out_latent, s) if return_styles else (image, out_latent)

    def synthesize_s(self, s: Sequence[torch.Tensor], noise=None, randomize_noise: bool = False) -> torch.Tensor:
        """S list -> image [B, 3, size, size]."""
        return self(list(s), input_is_stylespace=True, noise=noise, randomize_noise=randomize_noise)[0]

    def _synthesize(self, s: list[torch.Tensor], noise: Sequence[torch.Tensor | None]) -> torch.Tensor:
        dims = self.s_dims
        if len(s) != len(dims) or any(t.ndim != 2 or t.shape[1] != d for t, d in zip(s, dims)):
            raise ValueError(f"StyleSpace input must be {len(dims)} tensors of shape [B, C] with C = {dims}; got "
                             f"{[tuple(t.shape) for t in s]}")
        batch = s[0].shape[0]
        x = self.input(batch)  # [B, 512, 4, 4]
        x = self.conv1(x, s[0], noise[0])
        skip = self.to_rgb1(x, s[1])
        for k, rgb in enumerate(self.to_rgbs):
            x = self.convs[2 * k](x, s[2 + 3 * k], noise[1 + 2 * k])
            x = self.convs[2 * k + 1](x, s[3 + 3 * k], noise[2 + 2 * k])
            skip = rgb(x, s[4 + 3 * k], skip)
        return skip


# ---- loading rosinality checkpoints -----------------------------------------------------------------------
def infer_generator_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture arguments of a rosinality ``g_ema`` state dict."""
    noise_keys = [k for k in state if k.startswith("noises.noise_")]
    if "input.input" not in state or not noise_keys or "style.1.weight" not in state:
        raise GeneratorCheckpointError("state dict is not a rosinality StyleGAN2 generator (needs 'input.input', "
                                       f"'style.1.weight', 'noises.noise_*'); first keys: {list(state)[:6]}")
    num_layers = len(noise_keys)
    log_size = (num_layers - 1) // 2 + 2
    n_mlp = len({k.split(".")[1] for k in state if k.startswith("style.") and k.endswith(".weight")})
    cfg = {"size": 2 ** log_size, "style_dim": int(state["style.1.weight"].shape[0]), "n_mlp": n_mlp,
           "channel_max": int(state["input.input"].shape[1]), "channel_multiplier": 2}
    if log_size >= 6:  # the 64 px convs reveal the multiplier (unless capped)
        c64 = int(state["convs.6.conv.weight"].shape[1])
        if c64 < cfg["channel_max"]:
            cfg["channel_multiplier"] = max(1, c64 // 256) if c64 >= 256 else 2
    return cfg


def load_generator_state(generator: Generator, state: dict[str, torch.Tensor], source: str = "<state dict>",
                         assign: bool = False) -> None:
    """Strictly load a rosinality ``g_ema`` state dict; a resolution mismatch gets a clear error."""
    got = len([k for k in state if k.startswith("noises.noise_")])
    if got and got != generator.num_layers:
        got_size = 2 ** ((got - 1) // 2 + 2)
        raise GeneratorCheckpointError(
            f"{source} holds a {got_size} px generator ({got} noise buffers, W+ of {2 * ((got - 1) // 2 + 2) - 2} "
            f"rows) but the generator was built for {generator.size} px ({generator.num_layers} noise buffers, "
            f"W+ of {generator.n_latent} rows). Pass --generator-size {got_size} (or the matching checkpoint).")
    try:
        generator.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        raise GeneratorCheckpointError(f"{source} does not match the StyleGAN2 architecture "
                                       f"(size={generator.size}, style_dim={generator.style_dim}, "
                                       f"n_mlp={generator.n_mlp}): {str(e)[:800]}") from e


def read_generator_checkpoint(path: str | Path, key: str = "g_ema") -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Read a rosinality checkpoint (``{'g_ema': ..., 'latent_avg': ...}`` or a bare state dict) safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"StyleGAN2 checkpoint not found: {path}")
    try:  # training checkpoints also pickle an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GeneratorCheckpointError(f"Could not read StyleGAN2 checkpoint {path}: {type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(ckpt, dict):
        raise GeneratorCheckpointError(f"{path} holds a {type(ckpt).__name__}, expected a dict with '{key}'")
    if key in ckpt:
        state = ckpt[key]
    elif "input.input" in ckpt:
        state = ckpt
    else:
        raise GeneratorCheckpointError(f"{path} has no '{key}' entry (keys: {list(ckpt)[:8]}); expected a "
                                       f"rosinality checkpoint such as stylegan2-ffhq-config-f.pt")
    latent_avg = ckpt.get("latent_avg") if key in ckpt else None
    return state, latent_avg


def load_generator(path: str | Path, size: int | None = None, key: str = "g_ema",
                   device: str | torch.device = "cpu") -> Generator:
    """Build and strictly load a generator; ``size`` (if given) must match the checkpoint's resolution.

    The checkpoint's ``latent_avg`` (if any) is kept as ``generator.latent_avg`` ([1, style_dim]).
    """
    state, latent_avg = read_generator_checkpoint(path, key)
    cfg = infer_generator_config(state)
    if size is not None and size != cfg["size"]:
        raise GeneratorCheckpointError(
            f"{path} holds a {cfg['size']} px generator (W+ of {2 * int(math.log2(cfg['size'])) - 2} rows), but "
            f"size={size} was requested. Use --generator-size {cfg['size']} or a {size} px checkpoint.")
    gen = Generator(**cfg)
    load_generator_state(gen, state, str(path))
    gen.latent_avg = latent_avg.reshape(1, -1).float() if isinstance(latent_avg, torch.Tensor) else None
    return gen.to(device).eval()


def build_generator(checkpoint: str | None = None, size: int = 1024, style_dim: int = 512, n_mlp: int = 8,
                    channel_multiplier: int = 2, channel_max: int = 512, seed: int = 0,
                    device: str | torch.device = "cpu") -> Generator:
    """A frozen generator from a checkpoint, or (no checkpoint) a random one reproducible from ``seed``."""
    if checkpoint:
        gen = load_generator(checkpoint, size=size, device=device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = Generator(size, style_dim, n_mlp, channel_multiplier, channel_max=channel_max)
        gen.latent_avg = None
        gen = gen.to(device).eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    return gen
