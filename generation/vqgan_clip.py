"""VQGAN-CLIP generation with NTLB explainability-based spatial (bbox) conditioning and the paper's baselines.

Spec: styleclip_vqgan.md section 5 (VQGAN-CLIP) and ntlb_coop.md 4.3 (spatial conditioning). Methods (``method``):

- ``plain``:          VQGAN-CLIP, spherical distance of the full cutouts to every prompt (boxes ignored).
- ``textual``:        textual conditioning — the box is put into words ("... on the left", "... at the top right")
                      and only the full cutouts are scored.
- ``similarity``:     similarity-based — spherical distance averaged over the full cutouts and the cutouts masked
                      by the box (``X`` and ``X * M_k``, masking after CLIP normalisation as in the anchor).
- ``similarity2``:    similarity-based 2 — full cutouts plus cutouts of the box *crop* (the box region resampled to
                      CLIP's input size and augmented); our reading of the second baseline (UNVERIFIED).
- ``explainability``: NTLB — ``similarity`` plus ``lambda_k * (-score_k)`` where score_k is the soft overlap of the
                      soft-thresholded last-layer image relevance (start_layer=-1, cosine score, create_graph) with the
                      box seen through the same cutouts; lambda_k = expl_weight / sqrt(box area ratio).
                      ``spatial_loss``: ``anchor`` (the notebook's Dice-like soft precision), ``dice`` or ``iou``.

    xclip generate vqgan-clip --vqgan_config X.yaml --vqgan_ckpt X.ckpt --backbone ViT-B-32 --pretrained openai \
        --prompts "0,0,128,256=a dog" "160,64,96,96=a ball" --method explainability \
        --width 256 --height 256 --steps 1000 --out runs/vqgan/dog_ball
    xclip generate vqgan-clip --config configs/vqgan/ntlb_spatial.yaml --prompts "0,0,150,256=a dog"
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from xclip.generation.cutouts import MakeCutouts
from xclip.losses.spatial import SPATIAL_KINDS, box_mask, spatial_relevance_loss
from xclip.models.vqgan import VQGAN, replace_grad

Method = Literal["plain", "textual", "similarity", "similarity2", "explainability"]
METHODS: tuple[str, ...] = Method.__args__
log = logging.getLogger(__name__)
PROMPT_FORMAT = "'[L,T,W,H=]text[:weight[:stop]]', e.g. '0,0,16,32=a red circle:1.5'"


@dataclass
class RegionPrompt:
    """A text, optionally tied to a box (left, top, width, height) in output pixels; weight and stop as in
    VQGAN-CLIP's ``text:weight:stop`` (a negative weight pushes away)."""

    text: str
    bbox: tuple[float, float, float, float] | None = None
    weight: float = 1.0
    stop: float = float("-inf")


def parse_prompt(spec: str) -> RegionPrompt:
    """``"[L,T,W,H=]text[:weight[:stop]]"`` -> RegionPrompt (e.g. ``"0,0,16,32=a red circle:1.5"``)."""
    bbox = None
    head, sep, rest = spec.partition("=")
    if sep and _looks_like_box(head):
        try:
            bbox = tuple(float(p) for p in head.split(","))
        except ValueError:
            bbox = ()
        if len(bbox) != 4:
            raise ValueError(f"prompt {spec!r}: box {head!r} must be 4 numbers L,T,W,H (left, top, width, height "
                             f"in output pixels); the format is {PROMPT_FORMAT}")
        spec = rest
    parts = spec.rsplit(":", 2)
    vals = [parts[0], "1", "-inf"]
    nums = []
    for p in parts[1:]:  # only trailing numeric fields are weight/stop ("a: b" stays text)
        try:
            nums.append(float(p))
        except ValueError:
            nums = []
            vals[0] = spec
            break
    if nums:
        vals[0] = parts[0]
    text = vals[0].strip()
    if not text:
        raise ValueError(f"empty prompt text in {spec!r}")
    weight = nums[0] if len(nums) > 0 else 1.0
    stop = nums[1] if len(nums) > 1 else float("-inf")
    return RegionPrompt(text, bbox, weight, stop)


def _looks_like_box(head: str) -> bool:
    """Text before '=' that is meant as a box (numbers and commas, or starts like "0,0,"): it must then be one."""
    h = head.strip()
    return "," in h and (re.fullmatch(r"[\d\s.,+-]+", h) is not None and any(c.isdigit() for c in h)
                         or re.match(r"[+-]?\d+(\.\d*)?\s*,", h) is not None)


def position_words(bbox: Sequence[float], width: int, height: int) -> str:
    """Where a box's centre lies, in words: 'on the left', 'at the top right', 'in the centre'."""
    cx, cy = (bbox[0] + bbox[2] / 2) / width, (bbox[1] + bbox[3] / 2) / height
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    if h and v:
        return f"at the {v} {h}"
    if h or v:
        return f"on the {h or v}" if h else f"at the {v}"
    return "in the centre"


@dataclass
class VQGANCLIPConfig:
    width: int = 256
    height: int = 256
    steps: int = 500                      # nerdyrodent default (NTLB notebook: 1000)
    lr: float = 0.1                       # Adam (Crowson's notebook: 0.05)
    cutn: int = 32
    cut_pow: float = 1.0
    cut_method: Literal["pooling", "crops"] = "pooling"  # pooling: nerdyrodent/NTLB; crops: Crowson original
    augment: bool = True
    noise_fac: float = 0.1
    squash_size: int | None = None        # NTLB notebook squashes to 256x256 before the cutouts
    init: str = "random"                  # "random" codebook entries | "uniform" (rand*2, NTLB) | image path
    init_weight: float = 0.0              # z L2 regulariser weight (0 = off, spec default)
    init_reg: Literal["orig", "decay"] = "orig"  # orig: MSE(z, z_orig)*w/2 | decay: MSE(z, 0)*w/(2(2i+1))
    seed: int = 42
    method: Method = "explainability"
    expl_weight: float = 0.15
    weight_by_mask_ratio: bool = True
    spatial_loss: Literal["anchor", "dice", "iou"] = "anchor"
    threshold: float = 0.1
    temperature: float = 20.0
    relevance_score: Literal["cosine", "logit"] = "cosine"  # NTLB differentiates the raw cosine (not x100)
    template: str = "a photo of {}"
    save_every: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.spatial_loss not in SPATIAL_KINDS:
            raise ValueError(f"spatial_loss must be one of {SPATIAL_KINDS}, got {self.spatial_loss!r}")
        if self.init_reg not in ("orig", "decay"):
            raise ValueError(f"init_reg must be 'orig' or 'decay', got {self.init_reg!r}")
        if self.width < 1 or self.height < 1 or self.cutn < 1:
            raise ValueError(f"bad size/cutn: {self.width}x{self.height}, cutn {self.cutn} (each must be >= 1)")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps} (with no step the result is the random init); "
                             f"pass --steps 1 or more")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class GenerationResult:
    image: torch.Tensor                    # [3, H, W] in [0, 1]
    z: torch.Tensor                        # [1, e_dim, toks_y, toks_x]
    losses: list[dict[str, float]] = field(default_factory=list)
    prompts: list[RegionPrompt] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)         # (width, height) actually generated (multiple of f)
    seconds: float = 0.0
    change: float = float("nan")           # mean |final - initial image| (0: no VQGAN code changed)


def spherical_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """2*arcsin(|u-v|/2)^2 (= theta^2 / 2) of normalised embeddings u [n, D], v [D] -> [n]."""
    return (F.normalize(u, dim=-1) - F.normalize(v, dim=-1)).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


def prompt_loss(emb: torch.Tensor, target: torch.Tensor, weight: float, stop: float) -> torch.Tensor:
    """VQGAN-CLIP ``Prompt``: |w| * mean(sign(w) * d) with the gradient blocked where d < stop."""
    d = spherical_distance(emb, target) * math.copysign(1.0, weight)
    d = replace_grad(d, torch.maximum(d, torch.full_like(d, stop)))
    return abs(weight) * d.mean()


def _project(emb: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    emb = F.normalize(emb, dim=-1)
    return emb if projection is None else F.normalize(emb @ projection.t().to(emb), dim=-1)


def _load_init_image(path: str, width: int, height: int) -> torch.Tensor:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"init image not found: {p} (init must be 'random', 'uniform' or an image path)")
    img = Image.open(p).convert("RGB").resize((width, height), Image.LANCZOS)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return x.permute(2, 0, 1).float().div(255).unsqueeze(0)  # [1, 3, H, W]


def init_z(vqgan: VQGAN, cfg: VQGANCLIPConfig, generator: torch.Generator) -> torch.Tensor:
    f = vqgan.downsample_factor
    toks_x, toks_y = cfg.width // f, cfg.height // f
    if toks_x < 1 or toks_y < 1:
        raise ValueError(f"image size {cfg.width}x{cfg.height} is smaller than the VQGAN factor f={f}")
    dev = vqgan.codebook.device
    if cfg.init == "random":
        return vqgan.random_z(toks_y, toks_x, generator)
    if cfg.init == "uniform":
        return (torch.rand(1, vqgan.e_dim, toks_y, toks_x, generator=generator) * 2).to(dev)
    with torch.no_grad():
        return vqgan.encode(_load_init_image(cfg.init, toks_x * f, toks_y * f).to(dev) * 2 - 1)


def _check_prompts(prompts: Sequence[RegionPrompt], cfg: VQGANCLIPConfig, width: int, height: int) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    for p in prompts:
        if p.bbox is not None:
            if len(p.bbox) != 4:
                raise ValueError(f"bbox of prompt {p.text!r} must be (left, top, width, height), got {p.bbox}")
            try:
                box_mask(p.bbox, cfg.height, cfg.width)
            except ValueError as e:
                raise ValueError(f"prompt {p.text!r}: {e}") from None
    if cfg.method in ("similarity", "similarity2", "explainability") and not any(p.bbox for p in prompts):
        raise ValueError(f"method {cfg.method!r} needs at least one prompt with a bbox (L,T,W,H=text)")


def _scaled_box(bbox: Sequence[float], cfg: VQGANCLIPConfig, width: int, height: int) -> tuple[float, ...]:
    """Box given for the requested size -> box on the generated (multiple-of-f) size."""
    sx, sy = width / cfg.width, height / cfg.height
    return (bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy)


def generate(vqgan: VQGAN, backbone, prompts: Sequence[RegionPrompt], cfg: VQGANCLIPConfig,
             out_dir: str | Path | None = None, progress: bool = True,
             projection: torch.Tensor | None = None) -> GenerationResult:
    """Optimise a VQGAN latent so CLIP matches the prompts (and, per method, their boxes).

    ``projection``: optional [k, D] matrix (spelling projection W) applied to image and text embeddings of the
    similarity terms."""
    cfg.validate()
    f = vqgan.downsample_factor
    width, height = (cfg.width // f) * f, (cfg.height // f) * f
    _check_prompts(prompts, cfg, width, height)
    dev = vqgan.codebook.device
    backbone.freeze()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- texts and boxes ----------------------------------------------------------------------------
    def _text(p: RegionPrompt) -> str:
        t = cfg.template.format(p.text) if cfg.template else p.text
        if cfg.method == "textual" and p.bbox is not None:
            t = f"{t} {position_words(p.bbox, cfg.width, cfg.height)}"
        return t

    texts = [_text(p) for p in prompts]
    with torch.no_grad():
        tokens = backbone.tokenize(texts)                                          # [P, L]
        targets = _project(backbone.encode_text(tokens), projection)               # [P, D']
    boxed = [i for i, p in enumerate(prompts) if p.bbox is not None]
    boxes = [_scaled_box(prompts[i].bbox, cfg, width, height) for i in boxed]
    masks = torch.stack([box_mask(b, height, width, dev) for b in boxes]).unsqueeze(0) if boxed else None
    # masks: [1, K, H, W]; lambda_k = expl_weight / sqrt(area ratio)
    ratios = masks.mean((-2, -1))[0] if masks is not None else None               # [K]
    lambdas = (cfg.expl_weight / ratios.sqrt() if cfg.weight_by_mask_ratio else
               torch.full_like(ratios, cfg.expl_weight)) if ratios is not None else None
    use_masks = cfg.method in ("similarity", "explainability")

    cut_size = backbone.image_size
    cutouts = MakeCutouts(cut_size, cfg.cutn, cfg.cut_pow, cfg.cut_method, cfg.augment, cfg.noise_fac,
                          cfg.squash_size)
    box_cutouts = MakeCutouts(cut_size, cfg.cutn, 1.0, "pooling", cfg.augment, cfg.noise_fac)

    # ---- latent and optimiser -----------------------------------------------------------------------
    z = init_z(vqgan, replace_size(cfg, width, height), g).to(dev)
    z_orig = z.clone()
    z_min, z_max = vqgan.z_bounds()
    with torch.no_grad():
        first = vqgan.synth(z)[0].detach()                                          # [3, H, W] initial image
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.lr)

    if cfg.method == "explainability":
        from xclip.models.relevance import image_relevance
    out = Path(out_dir) if out_dir is not None else None
    history: list[dict[str, float]] = []
    t0 = time.time()

    def step_loss(i: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        img = vqgan.synth(z)                                                        # [1, 3, H, W]
        cut, mcut = cutouts(img, masks if use_masks else None, generator=g)         # [n,3,S,S], [n,K,S,S]
        x = backbone.normalize_pixels(cut)
        emb = _project(backbone.encode_image(x, normalize=False), projection)       # [n, D']
        terms: dict[str, torch.Tensor] = {}
        clip_total = img.new_zeros(())
        for j, p in enumerate(prompts):
            embs = [emb]
            if p.bbox is not None and j in boxed:
                k = boxed.index(j)
                if cfg.method in ("similarity", "explainability"):
                    xm = x * mcut[:, k:k + 1]                                        # mask after normalisation
                    embs.append(_project(backbone.encode_image(xm, normalize=False), projection))
                elif cfg.method == "similarity2":
                    l, t, bw, bh = (int(round(v)) for v in boxes[k])
                    crop = img[:, :, t:t + max(bh, 1), l:l + max(bw, 1)]
                    bc, _ = box_cutouts(crop, None, generator=g)
                    embs.append(_project(backbone.encode_image(backbone.normalize_pixels(bc), normalize=False),
                                         projection))
            clip_total = clip_total + prompt_loss(torch.cat(embs), targets[j], p.weight, p.stop)
        terms["clip"] = clip_total
        total = clip_total
        if cfg.method == "explainability":
            btok = tokens[boxed]                                                     # [K, L]
            rel = image_relevance(backbone, x, btok, start_layer=-1, create_graph=True,
                                  score=cfg.relevance_score)                         # [n, K, N]
            sp = spatial_relevance_loss(rel, mcut, cfg.spatial_loss, cfg.threshold, cfg.temperature)  # [K]
            w = torch.tensor([abs(prompts[j].weight) for j in boxed], device=sp.device)
            terms["spatial"] = (w * lambdas.to(sp) * sp).sum()
            for k, j in enumerate(boxed):
                terms[f"score_{k}"] = -sp[k].detach()
            total = total + terms["spatial"]
        if cfg.init_weight:
            if cfg.init_reg == "orig":
                reg = F.mse_loss(z, z_orig) * cfg.init_weight / 2
            else:
                reg = F.mse_loss(z, torch.zeros_like(z)) * cfg.init_weight / (2 * (2 * i + 1))
            terms["reg"] = reg
            total = total + reg
        terms["total"] = total
        return total, {k: float(v.detach()) for k, v in terms.items()}, img

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]vqgan-clip[/] {task.fields[method]}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeRemainingColumn())
    img = None
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("gen", total=cfg.steps, method=cfg.method, loss=float("nan"))
        for i in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            loss, logs, img = step_loss(i)
            loss.backward()
            opt.step()
            with torch.no_grad():
                z.copy_(torch.maximum(torch.minimum(z, z_max), z_min))
            if not math.isfinite(logs["total"]):
                raise FloatingPointError(f"vqgan-clip: the loss became {logs['total']} at step {i} ({logs}); "
                                         f"lower --lr (now {cfg.lr}) or check --init / the checkpoints")
            logs["step"] = i
            history.append(logs)
            bar.update(task, advance=1, loss=logs["total"])
            if out is not None and cfg.save_every and i % cfg.save_every == 0:
                save_image(img.detach()[0], out / f"step_{i:05d}.png")
    with torch.no_grad():
        final = vqgan.synth(z)[0].detach()                                          # [3, H, W]
    change = float((final - first).abs().mean())
    if float((final - first).abs().max()) < 1 / 255:
        log.warning("vqgan-clip (%s): the image did not change from its init after %d steps (no VQGAN code moved); "
                    "the result is the init noise: raise --steps or --lr (now %d, %g)", cfg.method, cfg.steps,
                    cfg.steps, cfg.lr)
    res = GenerationResult(final, z.detach(), history, list(prompts), (width, height), time.time() - t0, change)
    if out is not None:
        save_result(res, cfg, out)
    return res


def replace_size(cfg: VQGANCLIPConfig, width: int, height: int) -> VQGANCLIPConfig:
    from dataclasses import replace

    return replace(cfg, width=width, height=height)


def save_image(img: torch.Tensor, path: str | Path, comment: str | None = None) -> None:
    """[3, H, W] in [0, 1] -> PNG (atomic write; prompt stored in a tEXt chunk)."""
    import io

    from PIL import Image, PngImagePlugin

    from xclip.utils.io import atomic_write_bytes

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    info = PngImagePlugin.PngInfo()
    if comment:
        info.add_text("comment", comment)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def save_result(res: GenerationResult, cfg: VQGANCLIPConfig, out: str | Path) -> None:
    """final.png, losses.json (strict JSON: a prompt without stop has ``stop: null``), z.pt; each atomic."""
    from xclip.generation._cli import write_json
    from xclip.utils.io import atomic_torch_save

    out = Path(out)
    prompt_text = " | ".join(f"{p.text}@{p.bbox}" if p.bbox else p.text for p in res.prompts)
    save_image(res.image, out / "final.png", comment=prompt_text)
    write_json({"config": asdict(cfg), "prompts": [asdict(p) for p in res.prompts], "size": list(res.size),
                "seconds": res.seconds, "image_change": res.change, "losses": res.losses}, out / "losses.json")
    atomic_torch_save({"z": res.z.cpu()}, out / "z.pt")


# ---------------------------------------------------------------------------------------------------------
# command line: the `vqgan-clip` subcommand of `xclip generate`
# ---------------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """jsonargparse schema: models, prompts, the VQGANCLIPConfig fields, output."""
    p.add_argument("--vqgan_config", type=str | None, default=None,
                   help="taming yaml (e.g. vqgan_imagenet_f16_16384.yaml); 'tiny' = random tiny VQGAN (smoke tests)")
    p.add_argument("--vqgan_ckpt", type=str | None, default=None,
                   help="taming ckpt whose state_dict matches --vqgan_config")
    p.add_argument("--backbone", type=str, default="ViT-B-32", help="CLIP architecture (open_clip name)")
    p.add_argument("--pretrained", type=str | None, default="openai", help="open_clip tag or weights file")
    p.add_argument("--projection", type=str | None, default=None,
                   help="spelling-projection checkpoint (W) for the CLIP loss")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=str, nargs="+", default=[],
                   help=f"{PROMPT_FORMAT} (several: --prompts A B; replaces the config's list)")
    p.add_class_arguments(VQGANCLIPConfig, None)
    p.add_argument("--out", type=str, default="runs/vqgan_clip", help="output folder (final.png, losses.json, z.pt)")
    p.add_argument("--progress", type=bool, default=True, help="rich progress bar")


def config_from_args(args) -> VQGANCLIPConfig:
    from xclip.generation._cli import dataclass_from

    return dataclass_from(VQGANCLIPConfig, args)


def load_vqgan_from_args(config: str | None, ckpt: str | None, device: str = "cpu") -> VQGAN:
    from xclip.models.vqgan import load_vqgan, tiny_vqgan

    if config in (None, "tiny"):
        if ckpt:
            raise ValueError("--vqgan_ckpt given without --vqgan_config (the taming yaml)")
        return tiny_vqgan().to(device)
    return load_vqgan(config, ckpt, device=device)


def check_inputs(args) -> tuple[VQGANCLIPConfig, list[RegionPrompt]]:
    """Everything that can be checked before a model is built: settings, prompts, files, the output folder."""
    from xclip.generation._cli import check_device, check_file, check_out_dir

    cfg = config_from_args(args)
    try:
        cfg.validate()
        if not args.prompts:
            raise ValueError(f"no prompt given: pass --prompts {PROMPT_FORMAT.split(', e.g. ')[1]}")
        prompts = [parse_prompt(s) for s in args.prompts]
        _check_prompts(prompts, cfg, cfg.width, cfg.height)
    except ValueError as e:
        raise SystemExit(f"vqgan-clip: {e}") from None
    if args.vqgan_config not in (None, "tiny"):
        check_file(args.vqgan_config, "--vqgan_config", "taming yaml")
        if args.vqgan_ckpt is None:
            raise SystemExit(f"--vqgan_config {args.vqgan_config} needs --vqgan_ckpt (the matching taming ckpt)")
    elif args.vqgan_ckpt:
        raise SystemExit("--vqgan_ckpt given without --vqgan_config: pass the taming yaml it belongs to")
    check_file(args.vqgan_ckpt, "--vqgan_ckpt", "VQGAN checkpoint")
    check_file(args.projection, "--projection", "spelling-projection checkpoint")
    if cfg.init not in ("random", "uniform"):
        check_file(cfg.init, "--init", "init image ('random', 'uniform' or an image path)")
    check_device(args.device)
    check_out_dir(args.out)
    return cfg, prompts


def run(args) -> GenerationResult:
    from xclip.models.clip_backbone import build_clip

    cfg, prompts = check_inputs(args)  # fail before loading anything big
    vqgan = load_vqgan_from_args(args.vqgan_config, args.vqgan_ckpt, args.device)
    backbone = build_clip(args.backbone, args.pretrained, device=args.device).freeze()
    projection = None
    if args.projection:
        from xclip.lightning_modules.spelling import load_projection

        projection = load_projection(args.projection, expected_backbone=backbone.spec(),
                                     expected_dim=backbone.embed_dim).to(args.device)
    res = generate(vqgan, backbone, prompts, cfg, out_dir=args.out, progress=args.progress, projection=projection)
    print(json.dumps({"out": str(args.out), "size": list(res.size), "loss_first": res.losses[0]["total"],
                      "loss_last": res.losses[-1]["total"], "image_change": res.change,
                      "seconds": round(res.seconds, 2)}))
    return res


def main(argv: list[str] | None = None) -> GenerationResult:
    import sys

    from xclip import generate as cli

    return cli.main(["vqgan-clip", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
