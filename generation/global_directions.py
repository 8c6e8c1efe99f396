"""StyleCLIP global directions in StyleSpace (spec reference/styleclip_vqgan.md §4).

    xclip generate styleclip-global --neutral "face" --target "smiling face" --alpha 4.1 --beta 0.15 \
        --generator.checkpoint stylegan2-ffhq-config-f.pt --backbone ViT-B-32 --pretrained openai
    xclip generate styleclip-global --config configs/styleclip/global_smile.yaml --alpha -2 2

1. ``style_statistics``: S mean/std per channel over ``n_samples`` W's (seed 5, psi 0.7, cutoff 8) and the
   first ``n_codes`` S codes.
2. ``channel_relevance`` (slow, cached to disk atomically): for every channel c of the conv layers at
   <= 128 px, render ``n_images`` codes with s_c = mean_c -/+ alpha*sigma_c, encode with CLIP's standard
   preprocessing, normalise(mean_i normalise(normalise(e+) - normalise(e-))) -> fs3 [n_channels, D].
3. ``text_direction``: template-averaged (79 ImageNet templates) target minus neutral, normalised.
4. ``edit_styles``: r = fs3 . dt, zero |r| < beta, divide by max|r|, scale by sigma; s' = s + alpha * ds.

Deviation: the anchor's shallow ``copy.copy`` leaves each processed channel at its mean for all later channels;
here every channel is measured on the unmodified codes (the defect is not reproduced).

CLIP input (``preprocess``): ``torch`` (default) resizes the float render with torch's antialiased bicubic;
``anchor`` is the anchor's exact path: the render rounded to uint8, a PIL image, CLIP's own preprocess (PIL bicubic
resize of the short side, centre crop, mean/std).  The two differ by about 1.8 % in the channel relevance.
No channel above beta: the anchor divides 0 by 0 (NaN styles); here the scores stay 0 (no edit) and the count
printed is 0.  W+ truncation: the statistics use psi 0.7 on the first ``cutoff`` = 8 W+ rows (the anchor's GetCode);
the random faces to edit (no ``--latent_path``) use psi 0.7 on all rows (StyleCLIP's initial latent).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from xclip.models.clip_backbone import ClipBackbone
from xclip.models.stylegan2 import Generator
from xclip.utils.io import atomic_torch_save, load_torch_dict

log = logging.getLogger(__name__)


def imagenet_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates without 'a photo of many {}.' (79, as StyleCLIP)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES if t("{}") != "a photo of many {}."]


@dataclass
class StyleStats:
    mean: list[torch.Tensor]  # per S layer [C_l]
    std: list[torch.Tensor]  # [C_l]
    codes: list[torch.Tensor]  # first n_codes S codes, [n_codes, C_l]


def _sample_w_plus(generator: Generator, z: torch.Tensor, truncation: float, cutoff: int,
                   mean: torch.Tensor) -> torch.Tensor:
    w = generator.get_latent(z).unsqueeze(1).repeat(1, generator.n_latent, 1)  # [B, n_latent, D]
    rows = torch.arange(generator.n_latent, device=w.device).view(1, -1, 1) < cutoff
    return torch.where(rows, mean + truncation * (w - mean), w)


@torch.no_grad()
def style_statistics(generator: Generator, n_samples: int = 100_000, n_codes: int = 2000, truncation: float = 0.7,
                     cutoff: int = 8, seed: int = 5, batch_size: int = 1000, progress: bool = True) -> StyleStats:
    g = torch.Generator().manual_seed(seed)
    mean_w = generator.latent_avg if getattr(generator, "latent_avg", None) is not None \
        else generator.mean_latent(4096, generator=torch.Generator().manual_seed(seed + 1))
    mean_w = mean_w.to(generator.device).reshape(1, 1, -1)
    dims = generator.s_dims
    s1 = [torch.zeros(c, dtype=torch.float64) for c in dims]
    s2 = [torch.zeros(c, dtype=torch.float64) for c in dims]
    codes: list[list[torch.Tensor]] = [[] for _ in dims]
    n_done = 0
    with _bar(progress, "S statistics", n_samples) as (bar, task):
        while n_done < n_samples:
            b = min(batch_size, n_samples - n_done)
            z = torch.randn(b, generator.style_dim, generator=g).to(generator.device)
            s = generator.w_to_s(_sample_w_plus(generator, z, truncation, cutoff, mean_w))
            for j, t in enumerate(s):
                t64 = t.double().cpu()
                s1[j] += t64.sum(0)
                s2[j] += (t64 * t64).sum(0)
                kept = sum(c.shape[0] for c in codes[j])
                if kept < n_codes:
                    codes[j].append(t[: n_codes - kept].float().cpu())
            n_done += b
            if bar is not None:
                bar.update(task, advance=b)
    mean = [(a / n_samples).float() for a in s1]
    std = [((q / n_samples) - (a / n_samples) ** 2).clamp_min(0).sqrt().float() for a, q in zip(s1, s2)]
    return StyleStats(mean, std, [torch.cat(c) for c in codes])


def relevance_layers(generator: Generator, max_resolution: int = 128) -> list[int]:
    """Non-ToRGB S layers whose output is <= max_resolution (11 layers / 5,376 channels at 1024 px)."""
    rgb = set(generator.torgb_s_indices)
    return [j for j, r in enumerate(generator.s_resolutions()) if j not in rgb and r <= max_resolution]


ClipPreprocess = Literal["torch", "anchor"]


def clip_standard_input(backbone: ClipBackbone, images: torch.Tensor, preprocess: ClipPreprocess = "torch"
                        ) -> torch.Tensor:
    """Generator [-1, 1] [B, 3, H, W] -> CLIP's standard preprocessing [B, 3, S, S] (resize to image_size,
    mean/std normalisation); ``preprocess="anchor"``: uint8 render through PIL bicubic (module doc)."""
    if preprocess == "anchor":
        return clip_anchor_input(backbone, images)
    if preprocess != "torch":
        raise ValueError(f"preprocess={preprocess!r}; expected 'torch' or 'anchor'.")
    x = (images.clamp(-1, 1) + 1) / 2
    x = F.interpolate(x, size=(backbone.image_size, backbone.image_size), mode="bicubic", align_corners=False,
                      antialias=True)
    return backbone.normalize_pixels(x)


def clip_anchor_input(backbone: ClipBackbone, images: torch.Tensor) -> torch.Tensor:
    """The anchor's path: ((x + 1) * 127.5) rounded to uint8 as StyleGAN's image export, ``PIL.Image``, then CLIP's
    preprocess (``Resize(S, BICUBIC)`` on the short side, ``CenterCrop(S)``, ToTensor, mean/std)."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    size = backbone.image_size
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()])
    u8 = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # [B, 3, H, W]
    arrs = u8.permute(0, 2, 3, 1).cpu().numpy()
    x = torch.stack([tf(Image.fromarray(np.ascontiguousarray(a))) for a in arrs]).to(images.device)
    return backbone.normalize_pixels(x)


def _cache_key(meta: dict) -> str:
    return hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def channel_relevance(generator: Generator, backbone: ClipBackbone, stats: StyleStats, layers: Sequence[int] | None = None,
                      n_images: int = 100, alpha: float = 5.0, batch_size: int = 32, cache_dir: str | Path | None = None,
                      cache_meta: dict | None = None, progress: bool = True, preprocess: ClipPreprocess = "torch"
                      ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """fs3 [n_channels, D] and the (S layer, channel) of each row; cached under ``cache_dir`` when given.
    ``preprocess``: how renders reach CLIP (``torch`` default, ``anchor`` = uint8 + PIL bicubic; module doc)."""
    layers = list(relevance_layers(generator) if layers is None else layers)
    n_images = min(n_images, stats.codes[0].shape[0])
    meta = {"layers": layers, "n_images": n_images, "alpha": alpha, "clip": backbone.spec(),
            "generator": {"size": generator.size, "style_dim": generator.style_dim}, **(cache_meta or {})}
    if preprocess != "torch":  # keeps the cache keys of existing torch-preprocessed fs3 files
        meta["preprocess"] = preprocess
    path = Path(cache_dir) / f"fs3_{_cache_key(meta)}.pt" if cache_dir else None
    if path is not None and path.is_file():
        cached = load_torch_dict(path, "channel-relevance cache", ("fs3", "index"), "; delete it to recompute")
        log.info("channel relevance loaded from cache %s", path)
        return cached["fs3"], [tuple(x) for x in cached["index"]]
    dev = generator.device
    base = [c[:n_images].to(dev) for c in stats.codes]  # [n, C_l] each
    index = [(j, c) for j in layers for c in range(generator.s_dims[j])]
    rows = []
    with _bar(progress, "channel relevance", len(index)) as (bar, task):
        for j, c in index:
            diffs = []
            for lo in range(0, n_images, batch_size):
                hi = min(lo + batch_size, n_images)
                s = [t[lo:hi].repeat(2, 1) for t in base]  # [2b, C_l]: first half -, second half +
                s[j] = s[j].clone()
                shift = alpha * stats.std[j][c].to(dev)
                s[j][: hi - lo, c] = stats.mean[j][c].to(dev) - shift
                s[j][hi - lo:, c] = stats.mean[j][c].to(dev) + shift
                img = generator.synthesize_s(s, randomize_noise=False)
                e = backbone.encode_image(clip_standard_input(backbone, img, preprocess), normalize=True)  # [2b, D]
                diffs.append(F.normalize(e[hi - lo:] - e[: hi - lo], dim=-1))
            rows.append(F.normalize(torch.cat(diffs).mean(0), dim=-1).cpu())
            if bar is not None:
                bar.update(task, advance=1)
    fs3 = torch.stack(rows)  # [n_channels, D]
    if path is not None:
        atomic_torch_save({"fs3": fs3, "index": index, "meta": meta}, path)
        log.info("channel relevance cached to %s", path)
    return fs3, index


@torch.no_grad()
def text_direction(backbone: ClipBackbone, neutral: str, target: str, templates: Sequence[str] | None = None) -> torch.Tensor:
    """dt = normalise(t_target - t_neutral), each the normalised mean of normalised template embeddings. [D]."""
    from xclip.models.zero_shot import zero_shot_classifier

    neutral_e, target_e = zero_shot_classifier(backbone, [neutral, target], list(templates or imagenet_templates()))
    return F.normalize(target_e - neutral_e, dim=-1).float().cpu()


def channel_scores(fs3: torch.Tensor, dt: torch.Tensor, beta: float) -> torch.Tensor:
    """r_c = fs3_c . dt, zeroed where |r_c| < beta, divided by max|r| -> [n_channels]."""
    r = fs3.float() @ dt.float()
    r = torch.where(r.abs() >= beta, r, torch.zeros_like(r))
    peak = r.abs().max()
    return r / peak if peak > 0 else r


def auto_beta(fs3: torch.Tensor, dt: torch.Tensor, c_threshold: int = 20) -> float:
    """Largest beta in 0.10, 0.11, ..., 0.29 manipulating more than c_threshold channels; else 0.1."""
    r = (fs3.float() @ dt.float()).abs()
    chosen = 0.1
    for k in range(10, 30):
        beta = k / 100
        if int((r >= beta).sum()) > c_threshold:
            chosen = beta
    return chosen


def style_delta(scores: torch.Tensor, index: Sequence[tuple[int, int]], stats: StyleStats) -> list[torch.Tensor]:
    """Scatter per-channel scores into S layers, times sigma; ToRGB / uncovered layers get 0. -> list [C_l]."""
    delta = [torch.zeros_like(m) for m in stats.mean]
    for (j, c), r in zip(index, scores.tolist()):
        if r != 0:
            delta[j][c] = r * float(stats.std[j][c])
    return delta


def edit_styles(s: Sequence[torch.Tensor], delta: Sequence[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """s' = s + alpha * ds; s: list [B, C_l]."""
    return [t + alpha * d.to(t).unsqueeze(0) for t, d in zip(s, delta)]


# ---- CLI ------------------------------------------------------------------------------------------------------
class _bar:
    """A rich progress bar as a context manager yielding (progress, task), or (None, None) when disabled."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total
        self.progress = None

    def __enter__(self):
        if not self.enabled:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn())
        self.progress.__enter__()
        return self.progress, self.progress.add_task(self.description, total=self.total)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False


@dataclass
class GlobalDirectionConfig:
    """Settings of the ``styleclip-global`` subcommand (StyleCLIP global_torch defaults)."""

    neutral: str = ""                      # the text the direction starts from, e.g. "face" (required)
    target: str = ""                       # ... and ends at, e.g. "smiling face" (required)
    alpha: list[float] = field(default_factory=lambda: [4.1])  # manipulation strength(s)
    beta: float | Literal["auto"] = 0.15   # disentanglement threshold, or "auto"
    c_threshold: int = 20                  # auto beta: minimum channels (20 ffhq, 100 others)
    n_edit: int = 4                        # random faces to edit without --latent_path
    stats_samples: int = 100_000           # W samples of the S statistics
    n_images: int = 100                    # images per channel for the relevance
    max_resolution: int = 128              # conv layers at <= this resolution
    batch_size: int = 32
    clip_preprocess: ClipPreprocess = "torch"  # renders -> CLIP: float torch bicubic, or the anchor's uint8 + PIL


def add_arguments(p) -> None:
    from xclip.generation.styleclip_optimize import add_generator_arguments

    p.add_class_arguments(GlobalDirectionConfig, None, skip={"alpha"})
    p.add_argument("--alpha", type=float, nargs="+", default=[4.1], help="manipulation strength(s), e.g. --alpha -4 4")
    p.add_argument("--latent_path", type=str | None, default=None, help="W+ latents (N, n_latent, style_dim) to edit")
    p.add_argument("--cache_dir", type=str, default="cache/styleclip_global",
                   help="S statistics and channel relevance cache")
    p.add_argument("--out", type=str, default="results/styleclip_global", help="output folder (global_edit.png)")
    p.add_argument("--progress", type=bool, default=True)
    add_generator_arguments(p)


def check_inputs(args) -> GlobalDirectionConfig:
    from xclip.generation._cli import check_device, check_file, check_out_dir, check_range, check_text, dataclass_from
    from xclip.generation.styleclip_optimize import check_generator

    cfg = dataclass_from(GlobalDirectionConfig, args)
    check_text(cfg.neutral, "--neutral", "face")
    check_text(cfg.target, "--target", "smiling face")
    if cfg.neutral.strip() == cfg.target.strip():
        raise SystemExit(f"--neutral and --target are both {cfg.neutral!r}: the direction would be zero; give the "
                         f"edit as two different texts (e.g. --neutral face --target 'smiling face')")
    if not cfg.alpha:
        raise SystemExit("--alpha is empty; give one or more strengths, e.g. --alpha 4.1")
    if cfg.beta != "auto":
        check_range(cfg.beta, "--beta", 0, "a threshold on |fs3 . dt| (StyleCLIP: 0.1-0.3) or 'auto'")
    for flag, v in (("--stats_samples", cfg.stats_samples), ("--n_images", cfg.n_images),
                    ("--batch_size", cfg.batch_size), ("--n_edit", cfg.n_edit)):
        check_range(v, flag, 1, "it counts samples")
    check_file(args.latent_path, "--latent_path", "W+ latent file")
    check_generator(args)
    check_device(args.device)
    check_out_dir(args.cache_dir, "--cache_dir")
    check_out_dir(args.out)
    return cfg


def run(args) -> dict:
    from xclip.datamodules.latents import load_latents
    from xclip.generation._cli import save_png, write_json
    from xclip.generation.styleclip_optimize import build_models

    cfg = check_inputs(args)
    g = args.generator
    latents = load_latents(args.latent_path, g.size, g.style_dim) if args.latent_path else None
    gen, backbone = build_models(args)
    progress = args.progress
    ident = {"generator_checkpoint": str(g.checkpoint), "seed": args.seed,
             "stats_samples": cfg.stats_samples, "arch": [g.n_mlp, g.channel_multiplier, g.channel_max]}
    stats_path = Path(args.cache_dir) / f"s_stats_{_cache_key(ident)}.pt"
    if stats_path.is_file():
        d = load_torch_dict(stats_path, "S statistics cache", ("mean", "std", "codes"), "; delete it to recompute")
        stats = StyleStats(d["mean"], d["std"], d["codes"])
    else:
        stats = style_statistics(gen, n_samples=cfg.stats_samples, n_codes=max(cfg.n_images, 1),
                                 batch_size=min(1000, cfg.stats_samples), progress=progress)
        atomic_torch_save({"mean": stats.mean, "std": stats.std, "codes": stats.codes, "meta": ident}, stats_path)
    fs3, index = channel_relevance(gen, backbone, stats, relevance_layers(gen, cfg.max_resolution), cfg.n_images,
                                   batch_size=cfg.batch_size, cache_dir=args.cache_dir, cache_meta=ident,
                                   progress=progress, preprocess=cfg.clip_preprocess)
    dt = text_direction(backbone, cfg.neutral, cfg.target)
    beta = auto_beta(fs3, dt, cfg.c_threshold) if cfg.beta == "auto" else float(cfg.beta)
    scores = channel_scores(fs3, dt, beta)
    n_channels = int((scores != 0).sum())
    print(f"beta {beta:.2f}: num of channels being manipulated: {n_channels}")
    if n_channels == 0:
        log.warning("beta %.2f manipulates no channel: the edits equal the originals; lower --beta or use 'auto'",
                    beta)
    delta = style_delta(scores, index, stats)
    with torch.no_grad():
        if latents is None:
            from xclip.generation.styleclip_optimize import initial_latent

            latents = torch.cat([initial_latent(gen, "edit", 0.7, args.seed + k) for k in range(cfg.n_edit)])
        s = gen.w_to_s(latents.to(gen.device))
        rows = [gen.synthesize_s(s)]
        for a in cfg.alpha:
            rows.append(gen.synthesize_s(edit_styles(s, [d.to(gen.device) for d in delta], a)))
    out = Path(args.out)
    grid = torch.stack(rows, 1).flatten(0, 1).clamp(-1, 1).add(1).div(2).cpu()  # [N*(1+A), 3, H, W]
    save_png(grid, out / "global_edit.png", nrow=len(rows))
    summary = {"neutral": cfg.neutral, "target": cfg.target, "alpha": cfg.alpha, "beta": beta,
               "n_channels": n_channels, "config": asdict(cfg)}
    write_json(summary, out / "summary.json")
    print(f"wrote {out / 'global_edit.png'} (rows: original, alpha={cfg.alpha})")
    return summary
