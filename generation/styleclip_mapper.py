r"""Apply a trained StyleCLIP latent mapper to W+ latents (spec reference/styleclip_vqgan.md §3.2, §3.6).

    xclip generate styleclip-mapper --ckpt runs/mapper_purple_hair/best.ckpt \
        --latents data/styleclip/test_faces.pt --out results/mapper_purple_hair
    xclip generate styleclip-mapper --ckpt last.ckpt --n_random 8 --out results/mapper_random
    xclip generate styleclip-mapper --config configs/styleclip/apply_mapper_purple_hair.yaml

    xclip generate styleclip-mapper --ckpt pretrained_models/mapper/afro.pt --latents test_faces.pt \
        --out results/afro      # a mapper file released by / trained with StyleCLIP's own code

``--ckpt`` takes either

- the slim checkpoint written by ``xclip train fit`` (mapper tensors + hyperparameters); ``load_method_checkpoint``
  rebuilds the generator and CLIP from the hyperparameters; or
- a StyleCLIP mapper ``.pt`` (``mapper/training/coach.py``: ``{'state_dict': {'mapper.*', 'decoder.*'}, 'opts':
  {...}}``), read with ``weights_only=True``: the levels come from ``opts['no_coarse_mapper']`` /
  ``no_medium_mapper`` / ``no_fine_mapper``, the description from ``opts['description']``, the generator from the
  file's ``decoder.*`` tensors, CLIP is ViT-B-32 / openai as in StyleCLIP (``--backbone`` / ``--pretrained``).

``--generator_checkpoint`` overrides the generator (a path that has moved, or a StyleCLIP file without
``decoder.*``); ``--backbone`` / ``--pretrained`` override the CLIP used for the stats. The ArcFace net is not
built (inference does not use the ID loss).

Each latent w is edited as w_hat = w + 0.1 * M(w); both are rendered with ``randomize_noise=False``.
Writes to ``--out``:

- ``grid.png``: before | after, one row per latent, the first ``--grid_rows`` latents, cells resized to at most
  ``--grid_cell`` px;
- ``pairs/NNNNN.png``: before | after at full resolution for every latent, each written as soon as it is rendered
  (StyleCLIP's ``--couple_outputs``; off with ``--pairs false``);
- ``latents_source.pt`` and ``latents_edited.pt``: plain tensors (N, n_latent, style_dim), readable by
  ``datamodules.latents.load_latents`` (so by the other StyleCLIP subcommands);
- ``stats.json``: mean CLIP loss (1 - cos with the description) before and after, mean MSE(w_hat, w), and the
  wall time per batch of mapper + render of the edit (StyleCLIP's stats.txt "Runtime").
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def add_arguments(p) -> None:
    p.add_argument("--ckpt", type=str | None, default=None,
                   help="mapper checkpoint written by `xclip train fit`, or a StyleCLIP mapper .pt; required")
    p.add_argument("--latents", type=str | None, default=None,
                   help="W+ latent file (N, n_latent, style_dim), e.g. e4e's test_faces.pt")
    p.add_argument("--n_random", type=int | None, default=None,
                   help="edit N random faces instead: z ~ N(0, I) through the mapping network, truncated")
    p.add_argument("--n_images", type=int | None, default=None, help="edit only the first N latents of --latents")
    p.add_argument("--truncation", type=float | None, default=None,
                   help="psi for --n_random (default: the checkpoint's, 0.7)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --n_random z's")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--generator_checkpoint", type=str | None, default=None,
                   help="override the generator checkpoint path stored in the mapper checkpoint")
    p.add_argument("--backbone", type=str | None, default=None,
                   help="CLIP for the stats (default: the checkpoint's; ViT-B-32 for StyleCLIP files)")
    p.add_argument("--pretrained", type=str | None, default=None,
                   help="CLIP weights: tag / file / 'none' (default: the checkpoint's; openai for StyleCLIP files)")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=str, default="results/styleclip_mapper", help="output folder")
    p.add_argument("--grid_rows", type=int, default=16, help="latents shown in grid.png")
    p.add_argument("--grid_cell", type=int, default=256, help="max cell size (px) of grid.png")
    p.add_argument("--pairs", type=bool, default=True, help="write pairs/NNNNN.png")
    p.add_argument("--progress", type=bool, default=True)


def check_inputs(args) -> None:
    """Flags, files and the output folder, before the checkpoint or any model is loaded."""
    from xclip.generation._cli import check_device, check_file, check_out_dir

    if not args.ckpt:
        raise SystemExit("--ckpt is required: the mapper checkpoint written by `xclip train fit` "
                         "(e.g. runs/mapper_purple_hair/checkpoints/last.ckpt)")
    if (args.latents is None) == (args.n_random is None):
        raise SystemExit("give exactly one of --latents FILE or --n_random N (the latents to edit)")
    for flag, v in (("--n_random", args.n_random), ("--n_images", args.n_images), ("--batch_size", args.batch_size),
                    ("--grid_cell", args.grid_cell)):
        if v is not None and v < 1:
            raise SystemExit(f"{flag} must be >= 1, got {v}")
    check_file(args.ckpt, "--ckpt", "mapper checkpoint")
    check_file(args.latents, "--latents", "W+ latent file")
    check_file(args.generator_checkpoint, "--generator_checkpoint", "StyleGAN2 checkpoint")
    check_device(args.device)
    check_out_dir(args.out)


# ---- loading: this project's checkpoints and StyleCLIP's own mapper files -------------------------------------
@dataclass
class MapperSource:
    """A mapper file read once: ``kind`` ``"xclip"`` (train.py fit) or ``"styleclip"`` (StyleCLIP's ``.pt``), the
    generator resolution / style dim the latents must have, and the loaded file."""

    path: str
    kind: str
    size: int
    style_dim: int
    ckpt: dict[str, Any]


def read_mapper_source(path: str) -> MapperSource:
    """Read ``path`` (``weights_only=True``) and tell which kind of mapper file it is; errors name the file."""
    from xclip.lightning_modules.base import load_method_checkpoint, resolve_method
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule
    from xclip.models.mapper import is_styleclip_mapper_file, mapper_from_state
    from xclip.models.stylegan2 import infer_generator_config
    from xclip.utils.io import safe_torch_load

    ckpt = safe_torch_load(path, "mapper checkpoint")
    if is_styleclip_mapper_file(ckpt):
        mf = mapper_from_state(ckpt, path)  # validates levels / tensors now
        style_dim = int(mf.mapper.state_dict()[next(iter(mf.mapper.state_dict()))].shape[1])
        if mf.decoder_state:
            size = infer_generator_config(mf.decoder_state)["size"]
        else:
            size = int(mf.opts.get("stylegan_size", 1024))
        return MapperSource(path, "styleclip", size, style_dim, ckpt)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    if not isinstance(ckpt.get("state_dict"), dict) or "method" not in ckpt:
        load_method_checkpoint(path, expected=StyleCLIPMapperModule)  # raises, naming what the file lacks
    resolve_method(ckpt["method"], path, expected=StyleCLIPMapperModule)  # fixed table; raises, naming both
    hp = ckpt.get("hyper_parameters", {})
    if not isinstance(hp, dict):
        raise RuntimeError(f"{path}: 'hyper_parameters' is a {type(hp).__name__}, expected a mapping.")
    return MapperSource(path, "xclip", int(hp.get("generator_size", 1024)), int(hp.get("style_dim", 512)), ckpt)


def build_mapper_module(source: MapperSource, device: str, generator_checkpoint: str | None = None,
                        backbone: str | None = None, pretrained: str | None = None):
    """The StyleCLIPMapperModule (inference: no ArcFace, no image logging) of a mapper file."""
    from xclip.lightning_modules.base import load_method_checkpoint
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule

    overrides: dict[str, Any] = {"id_lambda": 0.0, "arcface_checkpoint": None, "image_log_every_n_steps": 0}
    if generator_checkpoint:
        overrides["generator_checkpoint"] = generator_checkpoint
    if backbone:
        overrides["backbone"] = backbone
    if pretrained is not None:
        overrides["pretrained"] = pretrained
    if source.kind == "xclip":
        return load_method_checkpoint(source.path, expected=StyleCLIPMapperModule, map_location=device,
                                      overrides=overrides)
    return _module_from_styleclip_file(source, overrides).to(device).eval()


def _module_from_styleclip_file(source: MapperSource, overrides: dict[str, Any]):
    """StyleCLIP's ``{'state_dict': {'mapper.*', 'decoder.*'}, 'opts'}``: levels and description from opts, the
    generator from ``decoder.*`` (or ``--generator_checkpoint``), CLIP ViT-B-32/openai unless overridden."""
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule
    from xclip.models.mapper import MapperFileError, mapper_from_state
    from xclip.models.stylegan2 import infer_generator_config, load_generator_state

    mf = mapper_from_state(source.ckpt, source.path)
    if not mf.description:
        raise MapperFileError(f"{source.path}: opts has no 'description' (StyleCLIP's --description).")
    gen_ckpt = overrides.get("generator_checkpoint")
    if not gen_ckpt and not mf.decoder_state:
        raise MapperFileError(f"{source.path} holds no 'decoder.*' generator tensors: pass the generator it was "
                              f"trained with, --generator_checkpoint stylegan2-ffhq-config-f.pt.")
    cfg = infer_generator_config(mf.decoder_state) if mf.decoder_state and not gen_ckpt else \
        {"size": source.size, "style_dim": source.style_dim}
    hp: dict[str, Any] = {"backbone": "ViT-B-32", "pretrained": "openai", "description": mf.description,  # StyleCLIP's
                          "generator_size": cfg["size"], "style_dim": cfg["style_dim"], **mf.mapper.enabled}
    hp.update({k: cfg[k] for k in ("n_mlp", "channel_multiplier", "channel_max") if k in cfg})
    hp.update(overrides)
    module = StyleCLIPMapperModule(**hp)
    if not gen_ckpt:  # the file's own generator replaces the random one the module starts with
        load_generator_state(module.generator, mf.decoder_state, f"{source.path} (decoder.*)")
        module.generator.latent_avg = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module.hparams.generator_seed + 1)
            mean = module.generator.mean_latent(module.hparams.n_mean_latent)
        module.mean_latent = mean.reshape(1, -1)
    module.mapper.load_state_dict(mf.mapper.state_dict(), strict=True)
    return module


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clamp(-1, 1).add(1).div(2).float().cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    check_inputs(args)
    from xclip.datamodules.latents import load_latents
    from xclip.generation._cli import save_png, write_json
    from xclip.generation.global_directions import _bar
    from xclip.utils.io import atomic_torch_save

    # validate the latent file against the checkpoint's generator before building anything big
    source = read_mapper_source(args.ckpt)
    latents = None
    if args.latents:
        latents = load_latents(args.latents, source.size, source.style_dim)  # [N, n_latent, D]; errors name shape
        if args.n_images is not None:
            latents = latents[: args.n_images]
    module = build_mapper_module(source, args.device, args.generator_checkpoint, args.backbone, args.pretrained)
    style_dim = source.style_dim
    device = module.mean_latent.device
    if latents is None:
        if args.truncation is not None:
            module.hparams.truncation = args.truncation
        z = torch.randn(args.n_random, style_dim, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            latents = module.to_w_plus(z.to(device)).cpu()  # [N, n_latent, D]
    n = latents.shape[0]
    out = Path(args.out)

    edited, grid_rows, times = [], [], []
    clip_before, clip_after, l2 = [], [], []
    with torch.no_grad(), _bar(args.progress, f"mapper: {module.hparams.description}", n) as (bar, task):
        for start in range(0, n, args.batch_size):
            w = latents[start:start + args.batch_size].to(device)
            x = module.render(w)
            _sync(device)
            t0 = time.perf_counter()
            w_hat = module.edit(w)
            x_hat = module.render(w_hat)
            _sync(device)
            times.append(time.perf_counter() - t0)
            edited.append(w_hat.cpu())
            clip_before += module.clip_loss(x).flatten().tolist()
            clip_after += module.clip_loss(x_hat).flatten().tolist()
            l2 += (w_hat - w).pow(2).mean(dim=(1, 2)).tolist()
            for k in range(w.shape[0]):
                i = start + k
                pair = torch.stack([_to_unit(x[k]), _to_unit(x_hat[k])])  # [2, 3, H, W]
                if args.pairs:
                    save_png(pair, out / "pairs" / f"{i:05d}.png", nrow=2, padding=0)
                if i < args.grid_rows:
                    if pair.shape[-1] > args.grid_cell:
                        pair = F.interpolate(pair, size=(args.grid_cell, args.grid_cell), mode="area")
                    grid_rows.append(pair)
            if bar is not None:
                bar.update(task, advance=w.shape[0])
    w_edited = torch.cat(edited)
    atomic_torch_save(latents.cpu().contiguous(), out / "latents_source.pt")
    atomic_torch_save(w_edited.contiguous(), out / "latents_edited.pt")
    save_png(torch.cat(grid_rows), out / "grid.png", nrow=2)
    stats = {
        "checkpoint": str(args.ckpt), "checkpoint_kind": source.kind, "description": module.hparams.description,
        "n": n,
        "source": str(args.latents) if args.latents else f"random z (seed {args.seed}, "
                                                         f"truncation {module.hparams.truncation})",
        "levels": {k: bool(v) for k, v in module.mapper.enabled.items()},
        "clip_loss_before": statistics.fmean(clip_before), "clip_loss_after": statistics.fmean(clip_after),
        "latent_mse": statistics.fmean(l2),
        "seconds_per_batch_mean": statistics.fmean(times),
        "seconds_per_batch_std": statistics.pstdev(times) if len(times) > 1 else 0.0,
        "batch_size": args.batch_size, "device": str(device),
    }
    write_json(stats, out / "stats.json")
    print(f"{n} edits '{stats['description']}': CLIP loss {stats['clip_loss_before']:.4f} -> "
          f"{stats['clip_loss_after']:.4f}, latent MSE {stats['latent_mse']:.3g}, "
          f"{stats['seconds_per_batch_mean'] * 1e3:.1f} ms/batch; wrote {out}")
    return {**stats, "latents_source": latents, "latents_edited": w_edited}
