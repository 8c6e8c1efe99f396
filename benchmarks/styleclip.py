"""StyleCLIP edit latency: latent mapper (one forward + render) vs latent optimisation (N steps), same run.

    python benchmarks/styleclip.py                         # tiny random generator + tiny CLIP on CPU
    python benchmarks/styleclip.py --generator-size 1024 --style-dim 512 --n-mlp 8 --channel-max 512 \
        --backbone ViT-B-32 --steps 300 --device cuda      # paper-sized (random weights; timing only)

Prints the median wall time per edit of each and the ratio optimisation / mapper (the paper reports ~98 s vs
~75 ms on a 1080 Ti, UNVERIFIED).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator-size", type=int, default=64)
    p.add_argument("--style-dim", type=int, default=64)
    p.add_argument("--n-mlp", type=int, default=2)
    p.add_argument("--channel-max", type=int, default=16)
    p.add_argument("--backbone", default="tiny-vit-test")
    p.add_argument("--steps", type=int, default=40, help="optimisation steps (StyleCLIP: 300; Colab: 40)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from xclip.generation.styleclip_optimize import OptimizeConfig, initial_latent, optimize_latent
    from xclip.losses.styleclip import ClipLoss
    from xclip.models.clip_backbone import build_clip
    from xclip.models.mapper import LevelsMapper
    from xclip.models.stylegan2 import build_generator

    dev = args.device
    gen = build_generator(None, args.generator_size, args.style_dim, args.n_mlp, 2, args.channel_max, device=dev)
    backbone = build_clip(args.backbone, None, device=dev).freeze()
    clip = ClipLoss(backbone, "a person with purple hair").to(dev)
    mapper = LevelsMapper(args.style_dim).to(dev).eval()
    w0 = initial_latent(gen, "edit", 0.7, seed=0, n_mean=1024)

    def mapper_edit() -> None:
        with torch.no_grad():
            gen([mapper.edit(w0)], input_is_latent=True, randomize_noise=False)

    cfg = OptimizeConfig(steps=args.steps)

    def optimisation_edit() -> None:
        optimize_latent(gen, clip, w0, cfg, progress=False)

    def timed(fn, repeats: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_map = timed(mapper_edit, max(args.repeats, 10))
    t_opt = timed(optimisation_edit, args.repeats)
    ratio = t_opt / t_map
    print(f"device {dev}, generator {args.generator_size}px (style {args.style_dim}), CLIP {args.backbone}")
    print(f"mapper edit (mapper + render):        {t_map * 1e3:9.2f} ms")
    print(f"optimisation edit ({args.steps} steps):       {t_opt * 1e3:9.2f} ms")
    print(f"ratio optimisation / mapper:          {ratio:9.1f}x")
    return {"mapper_s": t_map, "optimisation_s": t_opt, "ratio": ratio}


if __name__ == "__main__":
    main()
