"""CoOp training step on CPU: ours vs the anchors' formulations, with and without the NTLB loss.

    python benchmarks/coop_step.py                     # ViT-B-32 random init: 100 classes x batch 8, 1000 x batch 1
    python benchmarks/coop_step.py --quick             # reduced: 20 classes x batch 4, 50 x batch 1
    python benchmarks/coop_step.py --backbone tiny-vit-test --sizes 10x2 --anchor_images 2   # smoke

A step is: image features, prompt text features, CE (+ lambda * L_expl), backward to the context.  Four methods,
each in its own subprocess (its peak RSS growth over the built model is its own):
  * coop   CoOp's plain step (C trainers/coop.py CustomCLIP): the image tower on the batch, the text tower on the K
           full-length (77-token) prompts, CE, backward;
  * plain  ours without the loss (texts cut after the last EOT, exact for the causal tower);
  * ours   ours with the NTLB loss (losses/explainability.py: image features once per image, one text forward,
           B batched backward passes);
  * anchor the NTLB anchor's ``forward_backward`` (A external/CoOp/trainers/coop.py, spec §3.3, §3.5.3; written here,
           not used by the framework): the text tower once on the K full-length prompts, then for every image in a
           Python loop the image pushed through the image tower K times (once per class), y_b = sum of the diagonal
           logits, one ``autograd.grad`` per text layer (retain_graph), full (K, L, L) products R <- R + Abar @ R,
           the CoOp normalisation, CE + lambda * L_expl, backward.
The anchor uses fp16 on CUDA (CoOp PREC="fp16"); this benchmark runs on CPU, where both sides are fp32.
The anchor's cost is linear in the number of images and it keeps every image's graph until the backward, so it is
run on ``--anchor_images`` images and extrapolated to the batch as (step time - per-image loop time) + batch x mean
per-image loop time; the backward through each image's (K, L, L) products is counted once, so the extrapolation
slightly favours the anchor.  The same images give the equality check: L_expl and d(CE + lambda L_expl)/d ctx of
ours vs the anchor.  A method that does not fit under ``--mem_limit_gb`` (address-space cap set in the worker, so a
too-large run fails cleanly instead of pushing the shared machine into swap / the OOM killer) is reported as such.
Wall and process CPU time are both printed: the machine is shared, absolute times are noisy; ratios less so.
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


def coop_plain_step(m, x, y):
    """CoOp's own step (C CustomCLIP.forward): image tower on the batch, text tower on the full 77-token prompts."""
    import torch
    import torch.nn.functional as F

    from xclip.models.relevance import encode_text_from_embeddings

    with torch.no_grad():
        img = m.backbone.encode_image(x, normalize=True)  # frozen tower (CoOp: requires_grad False)
    embeds, eot = m.prompt_learner()  # [K, 77, W]
    t = F.normalize(encode_text_from_embeddings(m.backbone, embeds, eot), dim=-1)
    return F.cross_entropy(m.backbone.logit_scale * img @ t.T, y)


def _limit_memory(gb: float) -> None:
    import resource as r

    cap = int(gb * 2 ** 30)
    r.setrlimit(r.RLIMIT_AS, (cap, cap))


def _grad_list(pl):
    return pl.ctx.grad.detach().flatten().tolist()


def _worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    m, x, y = _setup(args)
    pl = m.prompt_learner
    base = _rss_mb()
    _limit_memory(args.mem_limit_gb)
    out: dict = {"method": args.worker}
    n = args.anchor_images
    try:
        if args.worker in ("plain", "ours", "coop"):
            m.hparams.expl_weight = args.expl_weight if args.worker == "ours" else 0.0
            m.hparams.expl_chunk_size = args.expl_chunk_size
            wall, cpu = [], []
            for i in range(args.steps + 1):  # first step is warm-up
                t0, c0 = time.perf_counter(), time.process_time()
                loss = coop_plain_step(m, x, y) if args.worker == "coop" else m.compute_losses(x, y)["loss"]
                pl.ctx.grad = None
                loss.backward()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            out["ms_per_step"] = 1000 * sum(wall[1:]) / args.steps
            out["cpu_ms_per_step"] = 1000 * sum(cpu[1:]) / args.steps
            out["peak_rss_growth_mb"] = _rss_mb() - base
            if args.worker == "ours":  # loss and gradient on the anchor's images, for the equality check
                sub = m.compute_losses(x[:n], y[:n])
                pl.ctx.grad = None
                sub["loss"].backward()
                out["expl_loss_subset"] = float(sub["expl"])
                out["grad_subset"] = _grad_list(pl)
        else:  # anchor on the first n images
            per_image: list[float] = []
            t0, c0 = time.perf_counter(), time.process_time()
            expl, _, t = anchor_expl_loss(m, x[:n], y[:n], per_image_seconds=per_image)
            with torch.no_grad():
                img = m.image_features(x[:n])
            ce = F.cross_entropy(m.backbone.logit_scale * img @ t.T, y[:n])
            pl.ctx.grad = None
            (ce + args.expl_weight * expl).backward()
            out["seconds"] = time.perf_counter() - t0
            out["cpu_seconds"] = time.process_time() - c0
            out["per_image_seconds"] = per_image
            out["images"] = n
            out["expl_loss_subset"] = float(expl)
            out["grad_subset"] = _grad_list(pl)
            out["peak_rss_growth_mb"] = _rss_mb() - base
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        out["out_of_memory"] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def _run_child(argv: list[str], worker: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", worker]
    env = dict(os.environ, OMP_NUM_THREADS=_arg(argv, "--threads"), MKL_NUM_THREADS=_arg(argv, "--threads"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker {worker} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _fmt_mem(r: dict) -> str:
    return "out of memory" if "out_of_memory" in r else f"+{r['peak_rss_growth_mb']:.0f} MB"


def _why(r: dict, args) -> str:
    return r["out_of_memory"] if r["out_of_memory"].startswith("not run") else \
        f"out of memory under {args.mem_limit_gb} GB address space"


def _report(args, classes: int, batch: int, res: dict) -> None:
    coop, plain, ours, anchor = (res[k] for k in ("coop", "plain", "ours", "anchor"))
    print(f"\nCoOp step, {args.backbone} (random init), {classes} classes, batch {batch}, n_ctx {args.n_ctx}, "
          f"class token middle, lambda {args.expl_weight}, expl chunk {args.expl_chunk_size}, CPU threads "
          f"{args.threads} (OMP/MKL_NUM_THREADS + torch.set_num_threads), steps {args.steps} (+1 warm-up)")
    print(f"  {'':26s} {'wall ms/step':>13s} {'CPU ms/step':>12s}   peak RSS growth")
    for label, r in (("CoOp's step (77 tokens)", coop), ("plain CoOp (ours)", plain), ("CoOp + expl (ours)", ours)):
        if "out_of_memory" in r:
            print(f"  {label:26s} {'-':>13s} {'-':>12s}   {_why(r, args)}")
        else:
            print(f"  {label:26s} {r['ms_per_step']:13.0f} {r['cpu_ms_per_step']:12.0f}   {_fmt_mem(r)}")
    anchor_ms = anchor_cpu_ms = None
    if "out_of_memory" in anchor:
        print(f"  {'anchor forward_backward':26s} {'-':>13s} {'-':>12s}   {_why(anchor, args)}")
    else:
        n = anchor["images"]
        loop = anchor["per_image_seconds"]
        per_image = sum(loop) / n
        anchor_ms = 1000 * (anchor["seconds"] - sum(loop) + batch * per_image)
        anchor_cpu_ms = 1000 * (anchor["cpu_seconds"] + (batch - n) * anchor["cpu_seconds"] * per_image
                                / anchor["seconds"])
        print(f"  {'anchor forward_backward':26s} {anchor_ms:13.0f} {anchor_cpu_ms:12.0f}   {_fmt_mem(anchor)} at {n} "
              f"image(s) (run on {n} of {batch}: {1000 * anchor['seconds']:.0f} ms, per-image loop "
              f"{', '.join(f'{1000 * v:.0f}' for v in loop)} ms; extrapolated)")
    if "out_of_memory" not in plain and "out_of_memory" not in coop:
        print(f"  speed-up CoOp's step / plain ours : x{coop['ms_per_step'] / plain['ms_per_step']:.1f} wall, "
              f"x{coop['cpu_ms_per_step'] / plain['cpu_ms_per_step']:.1f} CPU")
    if "out_of_memory" not in ours and "out_of_memory" not in plain:
        print(f"  overhead ours expl / plain ours   : x{ours['ms_per_step'] / plain['ms_per_step']:.2f} wall")
    if anchor_ms is not None and "out_of_memory" not in ours:
        print(f"  speed-up anchor / ours (expl)     : x{anchor_ms / ours['ms_per_step']:.1f} wall, "
              f"x{anchor_cpu_ms / ours['cpu_ms_per_step']:.1f} CPU   (goal >= 5)")
        diff = abs(ours["expl_loss_subset"] - anchor["expl_loss_subset"])
        ga, go = anchor["grad_subset"], ours["grad_subset"]
        gdiff = max(abs(a - b) for a, b in zip(ga, go))
        gscale = max(abs(a) for a in ga) or 1.0
        ok = diff <= 1e-5 and gdiff <= 1e-4 * gscale
        print(f"  on {anchor['images']} image(s): L_expl ours {ours['expl_loss_subset']:.7f} anchor "
              f"{anchor['expl_loss_subset']:.7f} |diff| {diff:.1e}; d loss/d ctx max|diff| {gdiff:.1e} "
              f"(max|grad| {gscale:.1e}) -> {'EQUAL' if ok else 'MISMATCH'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--sizes", nargs="+", default=None, help="CLASSESxBATCH, e.g. 100x8 1000x1 (the default)")
    p.add_argument("--quick", action="store_true", help="reduced sizes 20x4 50x1")
    p.add_argument("--n_ctx", type=int, default=16)
    p.add_argument("--expl_weight", type=float, default=1.0)
    p.add_argument("--expl_chunk_size", type=int, default=128, help="classes per relevance chunk (ours)")
    p.add_argument("--steps", type=int, default=1, help="timed steps for coop / plain / ours (after one warm-up step)")
    p.add_argument("--anchor_images", type=int, default=1,
                   help="images the anchor is run on (extrapolated to the batch); also the equality check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem_limit_gb", type=float, default=12.0)
    p.add_argument("--methods", nargs="+", default=["coop", "plain", "ours", "anchor"],
                   choices=["coop", "plain", "ours", "anchor"])
    p.add_argument("--classes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    sizes = args.sizes or (["20x4", "50x1"] if args.quick else ["100x8", "1000x1"])
    t_start = time.perf_counter()
    for size in sizes:
        classes, batch = (int(v) for v in size.lower().split("x"))
        n = min(args.anchor_images, batch)
        argv = ["--backbone", args.backbone, "--classes", str(classes), "--batch", str(batch), "--n_ctx",
                str(args.n_ctx), "--expl_weight", str(args.expl_weight), "--expl_chunk_size", str(args.expl_chunk_size),
                "--steps", str(args.steps), "--anchor_images", str(n), "--threads", str(args.threads),
                "--mem_limit_gb", str(args.mem_limit_gb)]
        res = {w: _run_child(argv, w) if w in args.methods else {"out_of_memory": "not run (--methods)"}
               for w in ("coop", "plain", "ours", "anchor")}
        args.anchor_images_used = n
        _report(args, classes, batch, res)
    print(f"  benchmark wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
