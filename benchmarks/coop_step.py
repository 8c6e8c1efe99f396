"""ms per CoOp training step on CPU: plain CoOp, CoOp + NTLB loss (ours), and the anchor's formulation.

    nice -n 15 .venv/bin/python benchmarks/coop_step.py            # ViT-B-32 random init, 100 classes, batch 8
    .venv/bin/python benchmarks/coop_step.py --backbone tiny-vit-test --classes 10 --anchor_images 1,2   # smoke

The anchor baseline (spec §3.3, §3.5.3; written here, not used by the framework): for every image in a Python
loop, the image is pushed through the image tower K times (once per class), y_b = sum of the diagonal logits, one
``autograd.grad`` per text layer (retain_graph), full (K, L, L) relevance products R <- R + Abar @ R, then the
CoOp normalisation.  It is linear in the number of images, so it is timed on ``--anchor_images`` subsets (two
sizes) and extrapolated linearly to the batch; the extrapolation is printed as such.  Each method runs in its own
subprocess so the reported peak memory (max RSS growth over the built model) is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _setup(args):
    import torch

    from lightning_modules.coop import CoOp

    torch.manual_seed(0)
    names = [f"thing {i}" for i in range(args.classes)]
    m = CoOp(args.backbone, None, classnames=names, n_ctx=args.n_ctx, class_token_position="middle",
             expl_weight=args.expl_weight)
    size = m.backbone.image_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    return m, x, y


def anchor_expl_loss(m, x, y, also_minimize: bool = True):
    """The anchor's per-image loop (see module doc). -> (L_expl, scores [B, K])."""
    import torch
    import torch.nn.functional as F

    from models.relevance import capture_attention, encode_text_from_embeddings

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
    S = torch.stack(rows)  # [B, K]
    gt = S[torch.arange(len(y)), y]
    loss = -gt.mean()
    if also_minimize:
        loss = loss + S.masked_fill(F.one_hot(y, K).bool(), 0).sum() / S.numel()
    return loss, S


def _worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    m, x, y = _setup(args)
    pl = m.prompt_learner
    base = _rss_mb()
    out: dict = {"method": args.worker}
    if args.worker in ("plain", "ours"):
        m.hparams.expl_weight = 0.0 if args.worker == "plain" else args.expl_weight
        times = []
        for i in range(args.steps + 1):  # first step is warm-up
            t0 = time.perf_counter()
            losses = m.compute_losses(x, y)
            pl.ctx.grad = None
            losses["loss"].backward()
            times.append(time.perf_counter() - t0)
        out["ms_per_step"] = 1000 * sum(times[1:]) / args.steps
        if args.worker == "ours":
            out["expl_loss"] = float(losses["expl"])
            n = args.check_images
            from losses.explainability import coop_expl_loss

            embeds, eot = pl()
            sub, _, _ = coop_expl_loss(m.backbone, m.image_features(x[:n]), embeds, eot, pl.name_mask, y[:n])
            out["expl_loss_subset"] = float(sub)
    else:  # anchor on a subset of images
        n = int(args.worker.split(":")[1])
        t0 = time.perf_counter()
        with torch.no_grad():
            img = m.image_features(x[:n])
        t_feats = pl.text_features()
        ce = torch.nn.functional.cross_entropy(m.backbone.logit_scale * img @ t_feats.T, y[:n])
        expl, _ = anchor_expl_loss(m, x[:n], y[:n])
        pl.ctx.grad = None
        (ce + args.expl_weight * expl).backward()
        out["seconds"] = time.perf_counter() - t0
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
    p.add_argument("--steps", type=int, default=2, help="timed steps for plain / ours (after one warm-up step)")
    p.add_argument("--anchor_images", default="1,2", help="two subset sizes the anchor is timed on")
    p.add_argument("--check_images", type=int, default=1, help="images used for the loss-equality check")
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    argv = [a for a in sys.argv[1:]]
    plain = _run_child(argv, "plain")
    ours = _run_child(argv, "ours")
    n1, n2 = (int(v) for v in args.anchor_images.split(","))
    a1, a2 = _run_child(argv, f"anchor:{n1}"), _run_child(argv, f"anchor:{n2}")
    per_image = (a2["seconds"] - a1["seconds"]) / (n2 - n1)
    anchor_ms = 1000 * (a1["seconds"] + per_image * (args.batch - n1))
    check = _run_child(argv + ["--check_images", str(n1)], "ours")
    diff = abs(check["expl_loss_subset"] - a1["expl_loss_subset"])
    print(f"CoOp step, {args.backbone} (random init), {args.classes} classes, batch {args.batch}, n_ctx {args.n_ctx}, "
          f"CPU threads {args.threads}")
    print(f"  plain CoOp          : {plain['ms_per_step']:10.1f} ms/step   peak RSS +{plain['peak_rss_growth_mb']:.0f} MB")
    print(f"  CoOp + expl (ours)  : {ours['ms_per_step']:10.1f} ms/step   peak RSS +{ours['peak_rss_growth_mb']:.0f} MB"
          f"   overhead x{ours['ms_per_step'] / plain['ms_per_step']:.2f} over plain")
    print(f"  anchor formulation  : {anchor_ms:10.1f} ms/step   (timed on {n1} and {n2} of {args.batch} images: "
          f"{1000 * a1['seconds']:.0f} / {1000 * a2['seconds']:.0f} ms, extrapolated linearly)   "
          f"peak RSS +{a2['peak_rss_growth_mb']:.0f} MB at {n2} images")
    print(f"  speed-up ours vs anchor: x{anchor_ms / ours['ms_per_step']:.1f}")
    print(f"  L_expl on {n1} image(s): ours {check['expl_loss_subset']:.7f}  anchor {a1['expl_loss_subset']:.7f}  "
          f"|diff| {diff:.2e} ({'OK' if diff <= 1e-5 else 'MISMATCH'} at 1e-5)")


if __name__ == "__main__":
    main()
