"""VQGAN-CLIP throughput at 256 px: cutn 32 vs cutn 8 (baseline measured in the same run), per method.

    python benchmarks/vqgan_clip.py                                  # tiny f16 VQGAN + tiny CLIP, CPU
    python benchmarks/vqgan_clip.py --vqgan_config X.yaml --vqgan_ckpt X.ckpt --backbone ViT-B-32 --pretrained openai \
        --device cuda --steps_per_image 500

Prints seconds per optimisation step (best of ``--repeats`` interleaved runs) and images/min for a run of ``--steps_per_image`` steps, and the ratio
(cutn 32 throughput / cutn 8 throughput). The default models are random: a VQGAN with the f16 layout of
``vqgan_imagenet_f16_16384`` but 32 channels (``--tiny``), and the CLIP architecture ``--backbone`` (no weights).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch  # noqa: E402

from xclip.generation.vqgan_clip import RegionPrompt, VQGANCLIPConfig, generate  # noqa: E402
from xclip.models.vqgan import load_vqgan, tiny_vqgan  # noqa: E402

TINY_F16 = {"ch_mult": [1, 1, 1, 1, 1], "resolution": 256, "attn_resolutions": [16]}


def time_steps(vqgan, backbone, prompts, cfg: VQGANCLIPConfig, steps: int) -> float:
    """Seconds per optimisation step (after one warm-up step)."""
    generate(vqgan, backbone, prompts, replace(cfg, steps=1), progress=False)
    if torch.cuda.is_available() and str(backbone.device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(vqgan, backbone, prompts, replace(cfg, steps=steps), progress=False)
    if torch.cuda.is_available() and str(backbone.device).startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan_config", default=None, help="taming yaml (default: tiny random f16 VQGAN)")
    p.add_argument("--vqgan_ckpt", default=None)
    p.add_argument("--backbone", default="tiny-vit-world", help="CLIP architecture (random weights by default)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest is reported")
    p.add_argument("--steps_per_image", type=int, default=500, help="steps of one generated image (spec: 500)")
    p.add_argument("--methods", default="plain,explainability")
    p.add_argument("--cutns", default="8,32", help="baseline first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from xclip.models.clip_backbone import build_clip

    vqgan = (load_vqgan(args.vqgan_config, args.vqgan_ckpt) if args.vqgan_config else
             tiny_vqgan(n_embed=1024, embed_dim=32, **TINY_F16)).to(args.device)
    backbone = build_clip(args.backbone, args.pretrained, device=args.device).freeze()
    half = args.size // 2
    prompts = [RegionPrompt("a red circle", (0, 0, half, args.size))]
    cutns = [int(c) for c in args.cutns.split(",")]
    print(f"device {args.device}, threads {torch.get_num_threads()}, VQGAN "
          f"{'tiny f16 (ch 32)' if not args.vqgan_config else args.vqgan_config} (f={vqgan.downsample_factor}), "
          f"CLIP {args.backbone} ({args.pretrained or 'random'}, {backbone.image_size} px), {args.size} px")
    results: dict = {}
    for method in args.methods.split(","):
        per: dict[int, float] = {}
        for _ in range(args.repeats):  # interleaved repeats, best kept: robust to other load on the machine
            for cutn in cutns:
                cfg = VQGANCLIPConfig(width=args.size, height=args.size, cutn=cutn, method=method, seed=0)
                per[cutn] = min(per.get(cutn, float("inf")), time_steps(vqgan, backbone, prompts, cfg, args.steps))
        for cutn, sec in per.items():
            print(f"{method:15s} cutn {cutn:3d}: {sec * 1000:8.1f} ms/step  "
                  f"{60 / (sec * args.steps_per_image):7.3f} images/min ({args.steps_per_image} steps)")
        base, other = cutns[0], cutns[-1]
        ratio = per[base] / per[other]
        print(f"{method:15s} throughput ratio cutn {other} / cutn {base}: {ratio:.3f}x "
              f"(cutn {other} is {1 / ratio:.2f}x slower)")
        results[method] = {"sec_per_step": per, "ratio": ratio}
    return results


if __name__ == "__main__":
    main()
