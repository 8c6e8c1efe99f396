"""Relevance engine vs the anchor's formulation (Chefer's CLIP notebook ``interpret``), ViT-B-32 shapes, CPU.

    python benchmarks/relevance.py                      # full: B=1xC=1, B=8xC=100, B=1xC=1000 at 1 and 2 threads
    python benchmarks/relevance.py --quick              # smoke: C reduced (B=1xC=1, B=2xC=8, B=1xC=16)
    python benchmarks/relevance.py --threads 1 --repeats 3 --anchor_pairs 4
    python benchmarks/relevance.py --threads 1 --repeats 5 --workloads 1x1:notebook 8x10:all   # chosen workloads
    python benchmarks/relevance.py --threads 1 --workloads 8x10:all --autograd_too   # + the engine on autograd

Anchor (implemented here after reading T's ``CLIP_explainability.ipynb`` ``interpret``; nothing pasted): one call
per (image, text) pair, both towers run on the full 77-token text inside every call, the attention probabilities of
every block are kept, then for each tower one ``torch.autograd.grad(y, [A_l], retain_graph=True)`` per layer from
the start layer up and the full [N, N] relevance matrix ``R <- R + bmm(Abar_l, R)``; image map ``R[0, 1:]``, text
map ``R[eot]``.  The anchor's cost is the same for every pair, so at B x C > 1 it is timed on ``--anchor_pairs``
pairs and extrapolated per pair (said in the output).  Ours: one ``relevance(...)`` call for all B x C pairs.

Workloads (start layers text / image): "notebook" -1/-1 (T's notebook HEAD), "ntlb" 0/-1 (NTLB: all text layers,
last image layer), "all" 0/0.  Each thread count runs in its own subprocess with OMP_NUM_THREADS / MKL_NUM_THREADS
set before torch is imported and ``torch.set_num_threads(n)``.  Each timing is the minimum over ``--repeats`` runs
(the machine is shared: absolute seconds are noisy, the ratios less so; the CPU ratio uses process CPU time, which
counts only this process's work and is the steadier measure on a loaded machine).  GFLOP are analytic matmul counts
(forward 24 N W^2 + 4 N^2 W per layer and sequence, backward 24 N W^2 + 8 N^2 W); "peak" is a 2048^3 fp32 matmul
measured in the same process before and after every workload (the max is used: load depresses single
measurements, which would flatter the fractions); "floor" is our algorithm's GFLOP at that peak (one text-tower
backward per image over all C texts, one image-tower backward per text over all B images, each only down to its
start layer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FULL = [(1, 1, "notebook"), (1, 1, "ntlb"), (8, 100, "ntlb"), (8, 100, "all"), (1, 1000, "ntlb")]
QUICK = [(1, 1, "notebook"), (1, 1, "ntlb"), (2, 8, "ntlb"), (2, 8, "all"), (1, 16, "ntlb")]
STARTS = {"notebook": (-1, -1), "ntlb": (0, -1), "all": (0, 0)}


def parse_workload(text: str) -> tuple[int, int, str]:
    """'8x100:all' -> (8, 100, 'all')."""
    try:
        size, kind = text.split(":")
        B, C = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"workload {text!r} is not BxC:kind (e.g. 8x100:all)") from None
    if kind not in STARTS or B < 1 or C < 1:
        raise argparse.ArgumentTypeError(f"workload {text!r}: kind must be one of {sorted(STARTS)}, B and C >= 1")
    return B, C, kind


# ------------------------------------------------------------------------------------------------ FLOP model
def _layer(n: int, N: int, W: int, backward: bool) -> float:
    return n * (24 * N * W * W + (8 if backward else 4) * N * N * W)


def _pooled_layer(n: int, N: int, W: int, backward: bool) -> float:
    """Last block for the pooled row only: K, V for N tokens; Q, out-proj, MLP for one token; one attention row."""
    return n * (4 * N * W * W + 20 * W * W + (8 if backward else 4) * N * W)


def flops_ours(B: int, C: int, L_used: int, start_t: int, start_i: int, dims: dict) -> float:
    Lt, Li, Wt, Wi, Ni = dims["text_layers"], dims["image_layers"], dims["text_width"], dims["image_width"], dims["patches"] + 1
    st, si = start_t % Lt, start_i % Li
    f = B * (2 * dims["patches"] * 3 * dims["patch"] ** 2 * Wi) + (Li - 1) * _layer(B, Ni, Wi, False) \
        + _pooled_layer(B, Ni, Wi, False)  # image forward
    f += (Lt - 1) * _layer(C, L_used, Wt, False) + _pooled_layer(C, L_used, Wt, False)  # text forward
    f += B * ((Lt - 1 - st) * _layer(C, L_used, Wt, True) + _pooled_layer(C, L_used, Wt, True))  # B text passes
    f += C * ((Li - 1 - si) * _layer(B, Ni, Wi, True) + _pooled_layer(B, Ni, Wi, True))  # C image passes
    return f


def flops_anchor_pair(start_t: int, start_i: int, dims: dict) -> float:
    """One anchor call: both full forwards (77 tokens) and one autograd.grad per layer, each reaching layer l."""
    Lt, Li, Wt, Wi, Ni = dims["text_layers"], dims["image_layers"], dims["text_width"], dims["image_width"], dims["patches"] + 1
    N_t = dims["context"]
    st, si = start_t % Lt, start_i % Li
    f = 2 * dims["patches"] * 3 * dims["patch"] ** 2 * Wi + Li * _layer(1, Ni, Wi, False) + Lt * _layer(1, N_t, Wt, False)
    f += sum((Lt - l) * _layer(1, N_t, Wt, True) for l in range(st, Lt))
    f += sum((Li - l) * _layer(1, Ni, Wi, True) for l in range(si, Li))
    return f


# ------------------------------------------------------------------------------------------------ the two sides
def anchor_interpret(model, image, token_row, start_t: int, start_i: int):
    """The notebook's ``interpret`` for one (image, text) pair: -> (text row R[eot] [77], image map R[0, 1:] [N])."""
    import torch
    import torch.nn.functional as F

    from xclip.models.relevance import capture_attention, encode_text_from_embeddings

    eot = int(token_row.argmax())
    with capture_attention(model, ("text", "visual")) as store:
        x = image.unsqueeze(0).requires_grad_(True)  # the notebook's model has trainable weights: A needs grad
        emb = model.token_embedding(token_row.unsqueeze(0)).detach().requires_grad_(True)  # [1, 77, W]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(encode_text_from_embeddings(model, emb, torch.tensor([eot])), dim=-1)
        logits_per_image = model.logit_scale.exp() * img @ txt.T  # [1, 1]
    one_hot = (torch.ones_like(logits_per_image) * logits_per_image).sum()
    maps = []
    for tower, start in (("visual", start_i), ("text", start_t)):
        blocks = store[tower]
        start = len(blocks) - 1 if start == -1 else start % len(blocks)
        N = blocks[0].shape[-1]
        R = torch.eye(N, dtype=blocks[0].dtype).unsqueeze(0).expand(1, N, N)
        for i, A in enumerate(blocks):
            if i < start:
                continue
            grad = torch.autograd.grad(one_hot, [A], retain_graph=True)[0].detach()
            cam = (grad * A.detach()).clamp(min=0).mean(dim=1)  # [1, N, N]
            R = R + torch.bmm(cam, R)
        maps.append(R[0, 0, 1:] if tower == "visual" else R[0, eot])
    return maps[1], maps[0]


def _dims(bb) -> dict:
    m = bb.model
    v = m.visual
    gs = v.grid_size
    return {"text_layers": len(m.transformer.resblocks), "image_layers": len(v.transformer.resblocks),
            "text_width": m.transformer.width, "image_width": v.transformer.width,
            "patches": int(gs[0]) * int(gs[1]), "patch": int(v.patch_size[0]), "context": m.positional_embedding.shape[0]}


def _peak_gflops(repeats: int) -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(max(3, repeats)))
    return 2 * 2048 ** 3 / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(args) -> None:
    import torch
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from xclip.models.clip_backbone import build_clip
    from xclip.models.relevance import relevance

    threads = args.threads[0]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bb = build_clip(args.model).freeze()
    model, dims = bb.model, _dims(bb)
    peaks = [_peak_gflops(args.repeats)]  # re-measured around every workload; the max is used (a loaded machine
    rows = []                              # depresses single measurements, which would flatter the fractions)
    for B, C, kind in args.workloads or (QUICK if args.quick else FULL):
        st, si = STARTS[kind]
        g = torch.Generator().manual_seed(B * 1000 + C)
        images = torch.randn(B, 3, bb.image_size, bb.image_size, generator=g)
        tokens = bb.tokenize([f"a photo of a {IMAGENET_CLASSNAMES[i % 1000]}." for i in range(C)])
        L_used = int(tokens.argmax(-1).max()) + 1
        relevance(bb, images[:1], tokens[:2], start_layer_text=st, start_layer_image=si)  # warm-up
        t_ours, c_ours = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = relevance(bb, images, tokens, start_layer_text=st, start_layer_image=si)
            t_ours.append(time.perf_counter() - t0)
            c_ours.append(time.process_time() - c0)
        ours, cpu_ours = min(t_ours), min(c_ours)
        if args.autograd_too:  # the same engine with the hand-written frozen backward switched off
            import xclip.models.relevance as rel_mod

            real_ok = rel_mod._frozen_tower_ok
            rel_mod._frozen_tower_ok = lambda *a: False
            t_ag, c_ag = [], []
            try:
                for _ in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    out_ag = relevance(bb, images, tokens, start_layer_text=st, start_layer_image=si)
                    t_ag.append(time.perf_counter() - t0)
                    c_ag.append(time.process_time() - c0)
            finally:
                rel_mod._frozen_tower_ok = real_ok
            ag_diff = max(float((out_ag.text - out.text).abs().max()), float((out_ag.image - out.image).abs().max()))
        n_pairs = min(B * C, args.anchor_pairs)
        pairs = [(i % B, (37 * i) % C) for i in range(n_pairs)]
        anchor_interpret(model, images[0], tokens[0], st, si)  # warm-up
        worst = 0.0
        t_anchor, c_anchor = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            res = [anchor_interpret(model, images[b], tokens[c], st, si) for b, c in pairs]
            t_anchor.append(time.perf_counter() - t0)
            c_anchor.append(time.process_time() - c0)
        for (b, c), (rt, ri) in zip(pairs, res):  # same numbers on both sides
            worst = max(worst, float((out.text[b, c] - rt).abs().max()), float((out.image[b, c] - ri).abs().max()))
        anchor = min(t_anchor) * B * C / n_pairs
        cpu_anchor = min(c_anchor) * B * C / n_pairs
        f_ours, f_anchor = flops_ours(B, C, L_used, st, si, dims), flops_anchor_pair(st, si, dims) * B * C
        rows.append({"B": B, "C": C, "kind": kind, "start_text": st, "start_image": si, "ours_s": ours,
                     "anchor_s": anchor, "anchor_pairs_timed": n_pairs, "ratio": anchor / ours,
                     "cpu_ratio": cpu_anchor / cpu_ours, "ours_cpu_s": cpu_ours, "anchor_cpu_s": cpu_anchor,
                     "gflop_ours": f_ours / 1e9, "gflop_anchor": f_anchor / 1e9, "max_abs_diff": worst})
        if args.autograd_too:
            rows[-1].update(autograd_s=min(t_ag), autograd_cpu_s=min(c_ag), autograd_max_abs_diff=ag_diff)
        peaks.append(_peak_gflops(args.repeats))
    peak = max(peaks)
    for r in rows:
        r.update(peak_frac_ours=r["gflop_ours"] / r["ours_s"] / peak, peak_frac_anchor=r["gflop_anchor"] / r["anchor_s"] / peak,
                 floor_s=r["gflop_ours"] / peak)
    print(json.dumps({"threads": threads, "peak_gflops": peak, "peaks_measured": peaks, "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="timings are the minimum over this many runs")
    ap.add_argument("--anchor_pairs", type=int, default=3, help="pairs the anchor is timed on (extrapolated per pair)")
    ap.add_argument("--quick", action="store_true", help="smoke run with reduced C")
    ap.add_argument("--workloads", type=parse_workload, nargs="+", default=None,
                    help="run only these workloads, each BxC:kind with kind notebook | ntlb | all (e.g. 1x1:notebook)")
    ap.add_argument("--autograd_too", action="store_true",
                    help="also time the engine with its hand-written frozen backward switched off (autograd's "
                         "batched backward instead), in the same process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    for n in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(n), "--model", args.model,
               "--repeats", str(args.repeats), "--anchor_pairs", str(args.anchor_pairs)] + (["--quick"] if args.quick else []) \
            + (["--autograd_too"] if args.autograd_too else []) \
            + (["--workloads", *(f"{B}x{C}:{k}" for B, C, k in args.workloads)] if args.workloads else [])
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"worker ({n} threads) failed:\n{res.stderr[-3000:]}")
        rep = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"\n{args.model} (random init), {n} thread(s) (OMP/MKL_NUM_THREADS={n}, torch.set_num_threads({n})), "
              f"measured fp32 GEMM peak {rep['peak_gflops']:.0f} GFLOP/s (max of {len(rep['peaks_measured'])} "
              f"measurements: {' '.join(f'{p:.0f}' for p in rep['peaks_measured'])}); min of {args.repeats} runs; "
              f"machine shared, absolute times noisy")
        print(f"{'workload':28s} {'anchor s':>10s} {'ours s':>9s} {'ratio':>7s} {'GFLOP anchor':>13s} {'GFLOP ours':>11s} "
              f"{'peak% anch':>10s} {'peak% ours':>10s} {'floor s':>8s} {'ours/floor':>10s} {'max|diff|':>9s} {'CPU ratio':>9s}")
        for r in rep["rows"]:
            label = f"B={r['B']} x C={r['C']} {r['kind']} ({r['start_text']}/{r['start_image']})"
            ext = "" if r["anchor_pairs_timed"] == r["B"] * r["C"] else "*"
            print(f"{label:28s} {r['anchor_s']:9.2f}{ext or ' '} {r['ours_s']:9.3f} {r['ratio']:6.2f}x "
                  f"{r['gflop_anchor']:13.1f} {r['gflop_ours']:11.1f} {100 * r['peak_frac_anchor']:9.0f}% "
                  f"{100 * r['peak_frac_ours']:9.0f}% {r['floor_s']:8.3f} {r['ours_s'] / r['floor_s']:9.1f}x "
                  f"{r['max_abs_diff']:9.1e} {r['cpu_ratio']:8.2f}x")
        for r in rep["rows"] if args.autograd_too else ():
            label = f"B={r['B']} x C={r['C']} {r['kind']} ({r['start_text']}/{r['start_image']})"
            print(f"{label:28s} engine without the frozen backward (autograd): {r['autograd_s']:.3f} s wall, "
                  f"{r['autograd_cpu_s']:.3f} s CPU; autograd / ours {r['autograd_s'] / r['ours_s']:.2f}x wall, "
                  f"{r['autograd_cpu_s'] / r['ours_cpu_s']:.2f}x CPU; anchor / autograd "
                  f"{r['anchor_cpu_s'] / r['autograd_cpu_s']:.2f}x CPU; "
                  f"{100 * r['gflop_ours'] / r['autograd_s'] / rep['peak_gflops']:.0f}% of peak; "
                  f"max|diff| {r['autograd_max_abs_diff']:.1e}")
        print("* anchor timed on %d pair(s) and extrapolated per pair to B x C" % args.anchor_pairs)


if __name__ == "__main__":
    main()
