"""StyleCLIP text-guided latent optimisation, with NTLB's optional semantic-word relevance loss.

Spec: reference/styleclip_vqgan.md §2 and reference/ntlb_coop.md §4.1.

    xclip generate styleclip-optimize --description "a person with purple hair" \
        --generator.checkpoint stylegan2-ffhq-config-f.pt --backbone ViT-B-32 --pretrained openai
    xclip generate styleclip-optimize --description "a person with purple hair" --desired_words "[0, 0, 0, 1, 1]" \
        --expl_weight 1.0 --id_lambda 0.005 --steps 200 ...                  # NTLB notebook settings
    xclip generate styleclip-optimize --config configs/styleclip/optimize_purple_hair_ntlb.yaml

Objective per step (W+ optimised with Adam, lr from ``get_lr``):
    L = (1 - cos(E_I(G(w)), E_T(t))) + l2_lambda * ||w - w0||^2 (summed) + id_lambda * ID(G(w), G(w0))
        - expl_weight * E,   E = sum_{tokens of S} w_t * rhat_t / #(w_t != 0),  rhat = R[eot, 1:eot] / sum
``free_generation`` mode: CLIP term only (no L2/ID), starting from the mean latent.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from xclip.losses.styleclip import ClipLoss, IDLoss, latent_l2_sum
from xclip.models.stylegan2 import Generator

log = logging.getLogger(__name__)


@dataclass
class OptimizeConfig:
    description: str = "a person with purple hair"
    steps: int = 300
    lr: float = 0.1
    lr_rampup: float = 0.05  # actually used here (StyleCLIP parses it but get_lr keeps its own 0.05)
    l2_lambda: float = 0.008
    id_lambda: float = 0.0
    truncation: float = 0.7
    mode: Literal["edit", "free_generation"] = "edit"
    work_in_stylespace: bool = False
    expl_weight: float = 0.0  # NTLB semantic-word loss weight (1.0 in NTLB)
    desired_words: list[float] | None = None  # one weight per whitespace word of description
    save_intermediate_every: int = 20


@dataclass
class OptimizeResult:
    latent: torch.Tensor  # final W+ [1, n_latent, D] (or the S list's W+ start when optimising S)
    latent_init: torch.Tensor
    image_init: torch.Tensor  # [1, 3, S, S] in [-1, 1]
    image_final: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    intermediate: list[torch.Tensor] = field(default_factory=list)
    styles: list[torch.Tensor] | None = None  # final S when work_in_stylespace
    seconds: float = 0.0


def get_lr(t: float, initial_lr: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    """lr at progress t in [0, 1]: linear warm-up over ``rampup``, cosine ramp-down over the last ``rampdown``."""
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return initial_lr * ramp * min(1.0, t / rampup)


# ---- NTLB semantic-word loss ---------------------------------------------------------------------------
class WordRelevanceLoss(torch.nn.Module):
    """E = sum_t w_t * rhat_t / #(w_t != 0) over the text tokens, rhat = R[eot, 1:eot] / sum (EGCLIPLoss).

    Token weights are the per-word ``desired_words`` expanded to the words' tokens, then min-max normalised.
    When every token gets the same weight (e.g. all words marked) the min-max division is 0/0 in the anchor
    (NaN); here the weights become 1 on every marked token, and since sum rhat = 1 that makes E a constant,
    so a warning says the term has no effect.
    """

    def __init__(self, clip_loss: ClipLoss, desired_words: Sequence[float]):
        super().__init__()
        from xclip.models.relevance import text_eot_index, word_token_spans

        self.clip_loss = clip_loss
        backbone = clip_loss.backbone
        text = clip_loss.description
        words = text.split()
        if len(desired_words) != len(words):
            raise ValueError(f"--desired_words has {len(desired_words)} values but the description {text!r} has "
                             f"{len(words)} words {words}; give one weight per whitespace-separated word")
        tokens = clip_loss.tokens  # [1, L]
        spans = word_token_spans(backbone.tokenizer, text, tokens[0].cpu())
        weights = torch.zeros(tokens.shape[1])
        for span, wt in zip(spans, desired_words):
            weights[span.start:span.end] = float(wt)
        eot = int(text_eot_index(backbone, tokens.to(backbone.device))[0])
        inner = weights[1:eot]
        if (inner != 0).sum() == 0:
            raise ValueError(f"--desired_words {list(desired_words)} marks no word of {text!r}; mark at least one "
                             f"(e.g. [0, 0, 0, 1, 1]) or drop --expl_weight")
        lo, hi = float(inner.min()), float(inner.max())
        if hi - lo > 0:
            inner = (inner - lo) / (hi - lo)
        else:  # all tokens equal: anchor divides 0/0
            log.warning("every word of %r is marked: the relevance of all tokens sums to 1, so the word loss is a "
                        "constant (no effect); mark a subset of words", text)
            inner = torch.ones_like(inner)
        weights = torch.zeros_like(weights)
        weights[1:eot] = inner
        self.constant = hi - lo == 0
        self.register_buffer("weights", weights, persistent=False)  # [L]
        self.n_marked = int((weights != 0).sum())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Generator images [B, 3, S, S] -> E [B] (differentiable w.r.t. the images, second order)."""
        from xclip.models.relevance import normalise_token_relevance, text_relevance

        backbone = self.clip_loss.backbone
        tokens = self.clip_loss.tokens.to(backbone.device)
        rel = text_relevance(backbone, self.clip_loss.prepare(images), tokens, start_layer=0, create_graph=True)
        eot = int(tokens[0].argmax())
        rhat = normalise_token_relevance(rel[:, 0], eot, "styleclip")  # [B, L]
        return (rhat * self.weights.to(rhat)).sum(-1) / self.n_marked


# ---- the optimisation loop ----------------------------------------------------------------------------
def initial_latent(generator: Generator, mode: str = "edit", truncation: float = 0.7, seed: int = 0,
                   n_mean: int = 4096) -> torch.Tensor:
    """Edit: z ~ N(0, I) mapped with truncation around mean_latent -> W+ [1, n_latent, D] (identical rows).
    free_generation: the mean latent repeated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean = generator.latent_avg if getattr(generator, "latent_avg", None) is not None \
            else generator.mean_latent(n_mean, generator=g)
        mean = mean.to(generator.device).reshape(1, -1)
        if mode == "free_generation":
            return mean.unsqueeze(1).repeat(1, generator.n_latent, 1)
        z = torch.randn(1, generator.style_dim, generator=g).to(generator.device)
        w = mean + truncation * (generator.get_latent(z) - mean)
    return w.unsqueeze(1).repeat(1, generator.n_latent, 1)


def optimize_latent(generator: Generator, clip_loss: ClipLoss, w_init: torch.Tensor, cfg: OptimizeConfig,
                    id_loss: IDLoss | None = None, word_loss: WordRelevanceLoss | None = None,
                    progress: bool = True) -> OptimizeResult:
    """Run the StyleCLIP optimisation from W+ ``w_init`` [1, n_latent, D]."""
    if cfg.mode not in ("edit", "free_generation"):
        raise ValueError(f"mode must be 'edit' or 'free_generation', got {cfg.mode!r}")
    if w_init.ndim != 3 or w_init.shape[1:] != (generator.n_latent, generator.style_dim):
        raise ValueError(f"initial latent has shape {tuple(w_init.shape)}; expected (1, {generator.n_latent}, "
                         f"{generator.style_dim}) for a {generator.size} px generator (a (N, ...) file renders N images)")
    if cfg.id_lambda > 0 and id_loss is None:
        raise ValueError(f"id_lambda={cfg.id_lambda} needs an ArcFace (--arcface_checkpoint model_ir_se50.pth)")
    if cfg.expl_weight > 0 and word_loss is None:
        raise ValueError("expl_weight > 0 needs the semantic word set (--desired_words)")
    edit = cfg.mode == "edit"
    w0 = w_init.detach().clone()
    with torch.no_grad():
        img0 = generator([w0], input_is_latent=True, randomize_noise=False)[0]
    if cfg.work_in_stylespace:
        s0 = [t.detach() for t in generator.w_to_s(w0)]
        rgb = set(generator.torgb_s_indices)
        s = [t.clone().requires_grad_(j not in rgb) for j, t in enumerate(s0)]
        params = [t for j, t in enumerate(s) if j not in rgb]
    else:
        w = w0.clone().requires_grad_(True)
        params = [w]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    result = OptimizeResult(latent=w0, latent_init=w0, image_init=img0, image_final=img0)
    start = time.perf_counter()
    bar = _progress(progress)
    with bar if bar is not None else _NullContext():
        task = bar.add_task(f"optimising '{cfg.description}'", total=cfg.steps) if bar is not None else None
        for i in range(cfg.steps):
            lr = get_lr(i / cfg.steps, cfg.lr, rampup=cfg.lr_rampup)
            for group in opt.param_groups:
                group["lr"] = lr
            if cfg.work_in_stylespace:
                img = generator.synthesize_s(s, randomize_noise=False)
            else:
                img = generator([w], input_is_latent=True, randomize_noise=False)[0]
            terms = {"clip": clip_loss(img).mean()}
            loss = terms["clip"]
            if edit:
                terms["l2"] = sum(latent_l2_sum(a, b) for a, b in zip(s, s0)) if cfg.work_in_stylespace \
                    else latent_l2_sum(w, w0)
                loss = loss + cfg.l2_lambda * terms["l2"]
                if id_loss is not None and cfg.id_lambda > 0:
                    terms["id"] = id_loss(img, img0)
                    loss = loss + cfg.id_lambda * terms["id"]
            if word_loss is not None and cfg.expl_weight > 0:
                terms["expl"] = word_loss(img).mean()
                loss = loss - cfg.expl_weight * terms["expl"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"step": i, "lr": lr, "loss": float(loss.detach())}
            row.update({k: float(v.detach()) for k, v in terms.items()})
            result.history.append(row)
            if cfg.save_intermediate_every and i > 0 and i % cfg.save_intermediate_every == 0:
                result.intermediate.append(img.detach().cpu())
            if bar is not None:
                bar.update(task, advance=1, description=f"loss {row['loss']:.4f} clip {row['clip']:.4f}")
    with torch.no_grad():
        if cfg.work_in_stylespace:
            result.styles = [t.detach() for t in s]
            result.image_final = generator.synthesize_s(result.styles, randomize_noise=False)
        else:
            result.latent = w.detach()
            result.image_final = generator([result.latent], input_is_latent=True, randomize_noise=False)[0]
        result.history.append({"step": cfg.steps, "clip": float(clip_loss(result.image_final).mean())})
    result.seconds = time.perf_counter() - start
    return result


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


# ---- CLI: the `styleclip-optimize` subcommand of `xclip generate` -----------------------------------------------
@dataclass
class GeneratorConfig:
    """The StyleGAN2 generator (``--generator.*``): a rosinality checkpoint (key g_ema) and its architecture;
    ``checkpoint: null`` = a RANDOM generator of that architecture (tests/demos only)."""

    checkpoint: str | None = None
    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channel_max: int = 512


def add_generator_arguments(p) -> None:
    """``--generator.*`` (GeneratorConfig), ``--backbone/--pretrained``, ``--device``, ``--seed``."""
    p.add_class_arguments(GeneratorConfig, "generator")
    p.add_argument("--backbone", type=str, default="ViT-B-32", help="CLIP architecture (open_clip name)")
    p.add_argument("--pretrained", type=str | None, default="openai", help="open_clip tag or weights file")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)


def check_generator(args) -> None:
    from xclip.generation._cli import check_file

    check_file(args.generator.checkpoint, "--generator.checkpoint", "StyleGAN2 checkpoint")
    g = args.generator
    if g.size < 4 or g.size & (g.size - 1):
        raise SystemExit(f"--generator.size {g.size}: must be a power of two >= 4 (e.g. 1024 for FFHQ)")


def build_models(args):
    from xclip.models.clip_backbone import build_clip
    from xclip.models.stylegan2 import build_generator

    g = args.generator
    if not g.checkpoint:
        log.warning("no --generator.checkpoint: using a RANDOM %d px generator (tests/demos only)", g.size)
    gen = build_generator(g.checkpoint, g.size, g.style_dim, g.n_mlp, g.channel_multiplier, g.channel_max,
                          seed=args.seed, device=args.device)
    backbone = build_clip(args.backbone, args.pretrained, device=args.device).freeze()
    return gen, backbone


def add_arguments(p) -> None:
    p.add_class_arguments(OptimizeConfig, None)
    p.add_argument("--arcface_checkpoint", type=str | None, default=None,
                   help="model_ir_se50.pth (needed when --id_lambda > 0)")
    p.add_argument("--latent_path", type=str | None, default=None,
                   help="W+ latent (1, n_latent, style_dim) .pt (e.g. from e4e)")
    p.add_argument("--out", type=str, default="results/styleclip_optimize",
                   help="output folder (final_result.png, latent.pt, history.json)")
    p.add_argument("--progress", type=bool, default=True)
    add_generator_arguments(p)


def check_inputs(args) -> OptimizeConfig:
    """Settings, files and the output folder, before any model is built."""
    from xclip.generation._cli import check_device, check_file, check_out_dir, check_range, check_text, dataclass_from

    cfg = dataclass_from(OptimizeConfig, args)
    check_text(cfg.description, "--description", "a person with purple hair")
    check_range(cfg.steps, "--steps", 1, "give the number of optimisation steps (StyleCLIP: 300)")
    check_range(cfg.expl_weight, "--expl_weight", 0, "it weighs the NTLB word-relevance term (0 = off)")
    if cfg.id_lambda > 0 and not args.arcface_checkpoint:
        raise SystemExit(f"--id_lambda {cfg.id_lambda} needs --arcface_checkpoint model_ir_se50.pth "
                         f"(or --id_lambda 0)")
    if cfg.expl_weight > 0 and not cfg.desired_words:
        raise SystemExit("--expl_weight > 0 needs --desired_words (one weight per word of --description, "
                         "e.g. [0, 0, 0, 1, 1])")
    if cfg.desired_words and len(cfg.desired_words) != len(cfg.description.split()):
        raise SystemExit(f"--desired_words has {len(cfg.desired_words)} values but --description "
                         f"{cfg.description!r} has {len(cfg.description.split())} words; give one weight per word")
    check_file(args.arcface_checkpoint if cfg.id_lambda > 0 else None, "--arcface_checkpoint", "ArcFace weights")
    check_file(args.latent_path, "--latent_path", "W+ latent file")
    check_device(args.device)
    check_generator(args)
    check_out_dir(args.out)
    return cfg


def run(args) -> OptimizeResult:
    from xclip.datamodules.latents import load_latents
    from xclip.generation._cli import save_png, write_json
    from xclip.models.arcface import load_arcface
    from xclip.utils.io import atomic_torch_save

    cfg = check_inputs(args)
    words = cfg.desired_words
    g = args.generator
    if args.latent_path:  # validate before building anything big
        w_init = load_latents(args.latent_path, g.size, g.style_dim)
        if w_init.shape[0] != 1:
            raise SystemExit(f"--latent_path {args.latent_path}: holds {w_init.shape[0]} latents; optimisation "
                             f"edits one, save latents[i:i+1]")
    gen, backbone = build_models(args)
    clip_loss = ClipLoss(backbone, cfg.description).to(args.device)
    w_init = w_init.to(args.device) if args.latent_path else initial_latent(gen, cfg.mode, cfg.truncation, args.seed)
    id_loss = IDLoss(load_arcface(args.arcface_checkpoint, args.device)) if cfg.id_lambda > 0 else None
    word_loss = WordRelevanceLoss(clip_loss, words).to(args.device) if words and cfg.expl_weight > 0 else None
    result = optimize_latent(gen, clip_loss, w_init, cfg, id_loss, word_loss, progress=args.progress)
    out = Path(args.out)
    save_png(torch.cat([result.image_init, result.image_final]).clamp(-1, 1).add(1).div(2).cpu(),
             out / "final_result.png")
    atomic_torch_save({"latent": result.latent.cpu(), "latent_init": result.latent_init.cpu()}, out / "latent.pt")
    write_json({"config": asdict(cfg), "seconds": result.seconds, "history": result.history}, out / "history.json")
    for k, img in enumerate(result.intermediate):
        save_png(img.clamp(-1, 1).add(1).div(2), out / f"step_{(k + 1) * cfg.save_intermediate_every:05d}.png")
    first, last = result.history[0]["clip"], result.history[-1]["clip"]
    print(f"CLIP loss {first:.4f} -> {last:.4f} in {cfg.steps} steps ({result.seconds:.1f} s); wrote {out}")
    return result
