"""ms per CoOp training step on CPU: plain CoOp, CoOp + NTLB loss (ours), and the anchor's formulation.

    nice -n 10 .venv/bin/python benchmarks/coop_step.py            # ViT-B-32 random init, 100 classes, batch 8
    .venv/bin/python benchmarks/coop_step.py --backbone tiny-vit-test --classes 10 --anchor_images 2   # smoke

A step is: frozen image features, prompt text features, CE (+ lambda * L_expl), backward to the context.
The anchor baseline (spec §3.3, §3.5.3; written here, not used by the framework): the text tower runs once on the
K full-length (77-token) prompts and its features serve CE and the loss; then for every image in a Python loop the
image is pushed through the image tower K times (once per class), y_b = sum of the diagonal logits, one
``autograd.grad`` per text layer (retain_graph), full (K, L, L) relevance products R <- R + Abar @ R, then the
CoOp normalisation.  Its cost is linear in the number of images and it keeps every image's graph until the
backward (about 3 GB per image for ViT-B-32 x 100 classes), so it is run on ``--anchor_images`` images and
extrapolated to the batch as  (step time - per-image loop time) + batch x mean per-image loop time;  the backward
through each image's (K, L, L) products (a few GFLOP, vs ~440 GFLOP of image forwards per image) is counted once,
so the extrapolation slightly favours the anchor.  The same images give the loss-equality check (ours vs anchor).
Each method runs in its own subprocess so its peak memory (max RSS growth over the built model) is its own.
Wall and process CPU time are both printed: on a shared machine CPU time is the steadier of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time



def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(args):
    import torch

    from xclip.lightning_modules.coop import CoOp

    torch.manual_seed(0)
    names = [f"thing {i}" for i in range(args.classes)]
    m = CoOp(args.backbone, None, classnames=names, n_ctx=args.n_ctx, class_token_position="middle",
             expl_weight=args.expl_weight)
    size = m.backbone.image_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    return m, x, y


def anchor_expl_loss(m, x, y, also_minimize: bool = True, per_image_seconds: list | None = None):
    """The anchor's per-image loop (see module doc). -> (L_expl, scores [B, K], text features [K, D] normalised)."""
    import torch
    import torch.nn.functional as F

    from xclip.models.relevance import capture_attention, encode_text_from_embeddings

    pl = m.prompt_learner
    embeds, eot = pl()  # [K, L, W]
    K, L = embeds.shape[:2]
    model = m.backbone.model
    with capture_attention(model, ("text",)) as store:
        t = F.normalize(encode_text_from_embeddings(model, embeds, eot), dim=-1)  # [K, D], full 77 tokens
    probs = store.probs["text"]  # 12 x [K, H, L, L]
    scale = model.logit_scale.exp()
    rows = []
    for b in range(x.shape[0]):
        t0 = time.perf_counter()
        with torch.no_grad():
            img = F.normalize(model.encode_image(x[b:b + 1].repeat(K, 1, 1, 1)), dim=-1)  # K image forwards
        y_b = (scale * img @ t.T).diagonal().sum()
        R = torch.eye(L).unsqueeze(0).repeat(K, 1, 1)  # [K, L, L]
        for A in probs:
            (G,) = torch.autograd.grad(y_b, [A], retain_graph=True)
            cam = (G * A).clamp(min=0).mean(dim=1)  # [K, L, L]
            R = R + torch.bmm(cam, R)
        r = R[torch.arange(K), eot].clone()  # [K, L]
        r[torch.arange(K), eot] = 0
        r = r / r.sum(-1, keepdim=True)
        rows.append((r * pl.name_mask).max(-1).values)  # [K]
        if per_image_seconds is not None:
            per_image_seconds.append(time.perf_counter() - t0)
    S = torch.stack(rows)  # [B, K]
    gt = S[torch.arange(len(y)), y]
    loss = -gt.mean()
    if also_minimize:
        loss = loss + S.masked_fill(F.one_hot(y, K).bool(), 0).sum() / S.numel()
    return loss, S, t


def _worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    m, x, y = _setup(args)
    pl = m.prompt_learner
    base = _rss_mb()
    out: dict = {"method": args.worker}
    n = args.anchor_images
    if args.worker in ("plain", "ours"):
        m.hparams.expl_weight = 0.0 if args.worker == "plain" else args.expl_weight
        wall, cpu = [], []
        for i in range(args.steps + 1):  # first step is warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            losses = m.compute_losses(x, y)
            pl.ctx.grad = None
            losses["loss"].backward()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out["ms_per_step"] = 1000 * sum(wall[1:]) / args.steps
        out["cpu_ms_per_step"] = 1000 * sum(cpu[1:]) / args.steps
        out["peak_rss_growth_mb"] = _rss_mb() - base
        if args.worker == "ours":  # loss on the anchor's images, for the equality check
            from xclip.losses.explainability import coop_expl_loss

            embeds, eot = pl()
            sub, _, _ = coop_expl_loss(m.backbone, m.image_features(x[:n]), embeds, eot, pl.name_mask, y[:n])
            out["expl_loss_subset"] = float(sub)
    else:  # anchor on the first n images
        per_image: list[float] = []
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            img = m.image_features(x[:n])
        expl, _, t = anchor_expl_loss(m, x[:n], y[:n], per_image_seconds=per_image)
        ce = F.cross_entropy(m.backbone.logit_scale * img @ t.T, y[:n])
        pl.ctx.grad = None
        (ce + args.expl_weight * expl).backward()
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = time.process_time() - c0
        out["per_image_seconds"] = per_image
        out["images"] = n
        out["expl_loss_subset"] = float(expl)
        out["peak_rss_growth_mb"] = _rss_mb() - base
    return out


def _run_child(argv: list[str], worker: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", worker]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker {worker} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n_ctx", type=int, default=16)
    p.add_argument("--expl_weight", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=1, help="timed steps for plain / ours (after one warm-up step)")
    p.add_argument("--anchor_images", type=int, default=2,
                   help="images the anchor is run on (extrapolated to --batch); also the loss-equality check")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 1 <= args.anchor_images <= args.batch:
        p.error(f"--anchor_images must be in 1..{args.batch}, got {args.anchor_images}")
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    t_start = time.perf_counter()
    argv = list(sys.argv[1:])
    plain = _run_child(argv, "plain")
    ours = _run_child(argv, "ours")
    anchor = _run_child(argv, "anchor")
    n, B = anchor["images"], args.batch
    loop = anchor["per_image_seconds"]
    per_image = sum(loop) / n
    anchor_ms = 1000 * (anchor["seconds"] - sum(loop) + B * per_image)
    cpu_per_image = anchor["cpu_seconds"] * per_image / anchor["seconds"]  # CPU share in proportion to wall
    anchor_cpu_ms = 1000 * (anchor["cpu_seconds"] + (B - n) * cpu_per_image)
    diff = abs(ours["expl_loss_subset"] - anchor["expl_loss_subset"])
    print(f"CoOp step, {args.backbone} (random init), {args.classes} classes, batch {B}, n_ctx {args.n_ctx}, "
          f"class token middle, lambda {args.expl_weight}, CPU threads {args.threads}, steps {args.steps} (+1 warm-up)")
    print(f"  {'':22s} {'wall ms/step':>13s} {'CPU ms/step':>12s}   peak RSS growth")
    print(f"  {'plain CoOp':22s} {plain['ms_per_step']:13.0f} {plain['cpu_ms_per_step']:12.0f}   "
          f"+{plain['peak_rss_growth_mb']:.0f} MB")
    print(f"  {'CoOp + expl (ours)':22s} {ours['ms_per_step']:13.0f} {ours['cpu_ms_per_step']:12.0f}   "
          f"+{ours['peak_rss_growth_mb']:.0f} MB")
    print(f"  {'anchor formulation':22s} {anchor_ms:13.0f} {anchor_cpu_ms:12.0f}   "
          f"+{anchor['peak_rss_growth_mb']:.0f} MB at {n} image(s)   (run on {n} of {B} images: "
          f"{1000 * anchor['seconds']:.0f} ms, per-image loop {', '.join(f'{1000 * v:.0f}' for v in loop)} ms; "
          f"extrapolated)")
    print(f"  overhead ours / plain : x{ours['ms_per_step'] / plain['ms_per_step']:.2f} wall, "
          f"x{ours['cpu_ms_per_step'] / plain['cpu_ms_per_step']:.2f} CPU")
    print(f"  speed-up anchor / ours: x{anchor_ms / ours['ms_per_step']:.1f} wall, "
          f"x{anchor_cpu_ms / ours['cpu_ms_per_step']:.1f} CPU   (goal >= 5)")
    print(f"  L_expl on {n} image(s): ours {ours['expl_loss_subset']:.7f}  anchor {anchor['expl_loss_subset']:.7f}  "
          f"|diff| {diff:.2e} ({'OK' if diff <= 1e-5 else 'MISMATCH'} at 1e-5)")
    print(f"  benchmark wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
