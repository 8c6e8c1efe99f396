"""ZeroCap (Tewel et al., CVPR 2022): zero-shot captioning by CLIP-guided optimisation of GPT-2's context cache.

Per generated token (ref. textspan_zerocap.md B3):
  1. p  = LM distribution of the next token given the full context (unshifted);
  2. C  = past key/values of context[:, :-1]; Delta = 0 on every key and value tensor of every layer;
  3. 5 x: p~ = LM(x_T | C + Delta); target q = softmax(CLIP(img, prefix + w_k) / 0.01) over the top-512 w_k of p~;
          L = clip_scale * CE(q, p~) + ce_scale * KL(p~ || p); Delta -= step * g / ||g||^gamma (per beam, per tensor);
  4. logits of x_T with C + Delta -> end / start / forbidden edits -> p_final ~ p~^beta * p^(1 - beta);
then length-normalised beam search (5 beams, 15 tokens, stop on "."), and the finished beams are re-ranked by CLIP.

Speed: one batched CLIP call over all beams' candidates per iteration (the anchor's batched variant), and CLIP text
features are memoised per string within a caption (candidate sets overlap heavily across iterations and beams).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xclip.models.clip_backbone import ClipBackbone


@dataclass
class ZeroCapConfig:
    """Defaults are the anchor's (B6). Arithmetic uses end_factor 1.06, fusion 0.95, grad_norm 0.95."""

    cond_text: str = "Image of a"
    target_seq_length: int = 15
    beam_size: int = 5
    num_iterations: int = 5
    top_size: int = 512
    clip_loss_temperature: float = 0.01
    clip_scale: float = 1.0
    ce_scale: float = 0.2
    stepsize: float = 0.3
    grad_norm_factor: float = 0.9
    fusion_factor: float = 0.99
    end_token: str = "."
    end_factor: float = 1.01
    start_factor: float = 1.6
    forbidden_factor: float = 20.0
    repetition_penalty: float = 1.0
    # The anchor divides p_final by its sum over ALL beams (B5 quirk 2); False normalises each beam's row.
    normalize_over_beams: bool = True
    prepend_bos: bool = True

    @classmethod
    def for_task(cls, task: str, **overrides) -> "ZeroCapConfig":
        """Task presets of the README (B4): caption, knowledge, ocr, arithmetic."""
        presets = {
            "caption": {},
            "knowledge": {"cond_text": "Image of", "end_factor": 1.04},
            "ocr": {"cond_text": "Image of text that says", "end_factor": 1.04},
            "arithmetic": {"end_factor": 1.06, "fusion_factor": 0.95, "grad_norm_factor": 0.95},
        }
        if task not in presets:
            raise ValueError(f"Unknown ZeroCap task {task!r}; choose from {sorted(presets)}.")
        return cls(**{**presets[task], **overrides})


@dataclass
class Caption:
    text: str                    # generated text (without the prompt)
    lm_score: float              # length-normalised beam log-probability
    clip_score: float = float("nan")  # cosine to the target
    tokens: list[int] = field(default_factory=list)


def forbidden_token_ids(tokenizer) -> list[int]:
    """Our own list (the anchor's .npy is unlicensed, B9): tokens that decode to digits/numbers, ! ( ) , : or newline."""
    banned_chars = set("!(),:\n")
    out = []
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        t = s.strip()
        if ("\n" in s) or (t and (t.isdigit() or all(c in banned_chars for c in t))):
            out.append(i)
    return out


def _push(logits: torch.Tensor, idx, factor: float, up: bool) -> torch.Tensor:
    """Scale raw logits so the edit always pushes in the intended direction (B3.6)."""
    x = logits[..., idx]
    if up:
        logits[..., idx] = torch.where(x > 0, x * factor, x / factor)
    else:
        logits[..., idx] = torch.where(x > 0, x / factor, x * factor)
    return logits


class ZeroCap(nn.Module):
    """CLIP-guided GPT-2 captioner. ``lm`` is a frozen HF causal LM (GPT-2 family), ``tokenizer`` its tokenizer."""

    def __init__(self, clip: ClipBackbone, lm: nn.Module, tokenizer, config: ZeroCapConfig | None = None,
                 memoize_clip_text: bool = True):
        super().__init__()
        self.memoize_clip_text = memoize_clip_text
        self.clip = clip.freeze()
        self.lm = lm.eval()
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.cfg = config or ZeroCapConfig()
        end_ids = tokenizer.encode(self.cfg.end_token)
        if len(end_ids) != 1:
            raise ValueError(f"end_token {self.cfg.end_token!r} must be one LM token, got ids {end_ids}.")
        self.end_id = end_ids[0]
        self.forbidden = torch.tensor([i for i in forbidden_token_ids(tokenizer) if i != self.end_id], dtype=torch.long)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.timing = {"clip": 0.0, "lm": 0.0}

    # ---- CLIP side ------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_target(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] CLIP-normalised -> [D] normalised target (several images: raw features summed, B2)."""
        feats = self.clip.encode_image(images.to(self.clip.device), normalize=False)  # [N, D]
        return F.normalize(feats.sum(0), dim=-1)

    @torch.no_grad()
    def arithmetic_target(self, images: torch.Tensor | None = None, image_weights: Sequence[float] = (),
                          texts: Sequence[str] = (), text_weights: Sequence[float] = ()) -> torch.Tensor:
        """v = sum_i w_i E_img(I_i) + sum_j u_j E_txt(t_j) on raw (unnormalised) embeddings, then v / |v| (B5)."""
        parts = []
        if images is not None and len(images):
            if len(image_weights) != len(images):
                raise ValueError(f"{len(images)} images but {len(image_weights)} image weights.")
            w = torch.tensor(list(image_weights), dtype=torch.float32, device=self.clip.device)
            parts.append((w[:, None] * self.clip.encode_image(images.to(self.clip.device), normalize=False)).sum(0))
        if texts:
            if len(text_weights) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(text_weights)} text weights.")
            u = torch.tensor(list(text_weights), dtype=torch.float32, device=self.clip.device)
            parts.append((u[:, None] * self.clip.encode_text(self.clip.tokenize(list(texts)), normalize=False)).sum(0))
        if not parts:
            raise ValueError("arithmetic_target needs at least one image or text term.")
        return F.normalize(torch.stack(parts).sum(0), dim=-1)

    @torch.no_grad()
    def clip_text_features(self, texts: list[str]) -> torch.Tensor:
        """[N] strings -> [N, D] normalised, memoised per string."""
        t0 = time.perf_counter()
        if not self.memoize_clip_text:
            self._text_cache.clear()
        todo = sorted({t for t in texts if t not in self._text_cache})
        for i in range(0, len(todo), 1024):
            chunk = todo[i:i + 1024]
            feats = self.clip.encode_text(self.clip.tokenize(chunk))
            self._text_cache.update(zip(chunk, feats))
        out = torch.stack([self._text_cache[t] for t in texts])
        self.timing["clip"] += time.perf_counter() - t0
        return out

    @torch.no_grad()
    def clip_target(self, probs: torch.Tensor, prefixes: list[str], target: torch.Tensor) -> torch.Tensor:
        """q [B, V]: softmax(cos(target, prefix_b + w_k) / tau) on the top-k w_k of probs [B, V], 0 elsewhere."""
        B, V = probs.shape
        k = min(self.cfg.top_size, V)
        top = probs.topk(k, dim=-1).indices  # [B, k]
        words = [self._decode_token(int(t)) for t in top.flatten()]
        texts = [prefixes[b] + words[b * k + j] for b in range(B) for j in range(k)]
        sims = (self.clip_text_features(texts) @ target).view(B, k).to(probs)  # [B, k]
        q = torch.zeros_like(probs)
        q.scatter_(1, top, F.softmax(sims / self.cfg.clip_loss_temperature, dim=-1))
        return q

    def _decode_token(self, i: int) -> str:
        cache = self.__dict__.setdefault("_tok_cache", {})
        if i not in cache:
            cache[i] = self.tokenizer.decode([i])
        return cache[i]

    # ---- LM side --------------------------------------------------------------------------------------
    def _lm(self, ids: torch.Tensor, past=None):
        t0 = time.perf_counter()
        out = self.lm(input_ids=ids, past_key_values=past, use_cache=past is None)
        self.timing["lm"] += time.perf_counter() - t0
        return out

    @staticmethod
    def _shifted_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], delta: list[tuple[torch.Tensor, torch.Tensor]]):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(k + dk, v + dv) for (k, v), (dk, dv) in zip(kv, delta)])

    def edit_logits(self, logits: torch.Tensor, context: torch.Tensor, step: int) -> torch.Tensor:
        """Repetition penalty (last 4 tokens), end-token boost (step >= 1) or start suppression, forbidden ids."""
        logits = logits.clone()
        c = self.cfg
        if c.repetition_penalty != 1.0:
            for b in range(logits.shape[0]):
                _push(logits[b], context[b, -4:].unique(), c.repetition_penalty, up=False)
        if step >= 1:
            _push(logits, self.end_id, c.end_factor, up=True)
        else:
            _push(logits, self.end_id, c.start_factor, up=False)
        if len(self.forbidden):
            _push(logits, self.forbidden.to(logits.device), c.forbidden_factor, up=False)
        return logits

    def next_log_probs(self, context: torch.Tensor, step: int, target: torch.Tensor) -> torch.Tensor:
        """context [B, T] -> log p_final [B, V] (steps 1-4 of the module docstring)."""
        c = self.cfg
        with torch.no_grad():
            p = F.softmax(self._lm(context).logits[:, -1].float(), dim=-1)  # [B, V] unshifted
        if context.shape[1] < 2 or c.num_iterations == 0:
            shifted_logits = self._lm(context).logits[:, -1].float().detach()
        else:
            with torch.no_grad():
                past = self._lm(context[:, :-1]).past_key_values
                kv = [(layer.keys.detach(), layer.values.detach()) for layer in past.layers]  # L x [B, H, T-1, d]
            delta = [(torch.zeros_like(k, requires_grad=True), torch.zeros_like(v, requires_grad=True)) for k, v in kv]
            prefixes = [self._prefix_text(row) for row in context]
            last = context[:, -1:]
            for _ in range(c.num_iterations):
                logits = self._lm(last, self._shifted_cache(kv, delta)).logits[:, -1].float()  # [B, V]
                log_pt = F.log_softmax(logits, dim=-1)
                q = self.clip_target(log_pt.detach().exp(), prefixes, target)
                loss_clip = -(q * log_pt).sum()
                loss_fluency = (log_pt.exp() * (log_pt - p.clamp_min(1e-30).log())).sum()
                loss = c.clip_scale * loss_clip + c.ce_scale * loss_fluency
                t0 = time.perf_counter()
                flat = [t for pair in delta for t in pair]
                grads = torch.autograd.grad(loss, flat)
                self.timing["lm"] += time.perf_counter() - t0
                with torch.no_grad():
                    new = []
                    for d, g in zip(flat, grads):  # per beam, per tensor normalisation
                        norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
                        new.append((d - c.stepsize * g / (norm + 1e-15) ** c.grad_norm_factor).requires_grad_(True))
                delta = [(new[2 * i], new[2 * i + 1]) for i in range(len(kv))]
            with torch.no_grad():
                shifted_logits = self._lm(last, self._shifted_cache(kv, delta)).logits[:, -1].float()
        pt = F.softmax(self.edit_logits(shifted_logits, context, step), dim=-1)
        fused = pt.pow(c.fusion_factor) * p.pow(1 - c.fusion_factor)
        norm = fused.sum() if c.normalize_over_beams else fused.sum(-1, keepdim=True)
        return (fused / norm).clamp_min(1e-45).log()

    def _prefix_text(self, row: torch.Tensor) -> str:
        ids = row.tolist()
        if self.cfg.prepend_bos and self.tokenizer.bos_token_id is not None and ids and \
                ids[0] == self.tokenizer.bos_token_id:
            ids = ids[1:]
        return self.tokenizer.decode(ids)

    def context_tokens(self) -> torch.Tensor:
        ids = self.tokenizer.encode(self.cfg.cond_text)
        if self.cfg.prepend_bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return torch.tensor([ids], device=self.clip.device)

    # ---- beam search ----------------------------------------------------------------------------------
    def beam_search(self, target: torch.Tensor) -> list[Caption]:
        """Length-normalised beam search (B3.7). Returns beams sorted by average log-probability."""
        c = self.cfg
        context = self.context_tokens()  # [1, T]
        gen = scores = None
        lengths = torch.ones(c.beam_size, device=context.device)
        stopped = torch.zeros(c.beam_size, dtype=torch.bool, device=context.device)
        for step in range(c.target_seq_length):
            logp = self.next_log_probs(context, step, target)  # [B, V]
            V = logp.shape[-1]
            if scores is None:
                scores, nxt = logp[0].topk(c.beam_size)  # [beam]
                context = context.expand(c.beam_size, -1)
                gen = nxt[:, None]
                stopped = nxt.eq(self.end_id)
            else:
                logp = logp.clone()
                logp[stopped] = -math.inf
                logp[stopped, 0] = 0.0  # a stopped beam carries its score forward
                total = scores[:, None] + logp  # [beam, V]
                lengths = lengths + (~stopped).float()
                avg = total / lengths[:, None]
                best, flat = avg.flatten().topk(c.beam_size)
                src, nxt = flat // V, flat % V
                lengths, stopped, gen = lengths[src], stopped[src], torch.cat([gen[src], nxt[:, None]], 1)
                context = context[src]
                scores = best * lengths
                stopped = stopped | nxt.eq(self.end_id)
            context = torch.cat([context, gen[:, -1:]], dim=1)
            if bool(stopped.all()):
                break
        order = (scores / lengths).argsort(descending=True)
        out = []
        for b in order.tolist():
            toks = gen[b, : int(lengths[b].item())].tolist()
            out.append(Caption(self.tokenizer.decode(toks), float(scores[b] / lengths[b]), tokens=toks))
        return out

    def caption(self, target: torch.Tensor) -> list[Caption]:
        """Beams re-ranked by CLIP cosine to the target (B3.8): best first."""
        self._text_cache.clear()
        beams = self.beam_search(target)
        feats = self.clip_text_features([b.text for b in beams])
        for b, s in zip(beams, (feats @ target).tolist()):
            b.clip_score = s
        return sorted(beams, key=lambda b: -b.clip_score)


def clip_s(clip: ClipBackbone, images: torch.Tensor, captions: Sequence[str], w: float = 2.5) -> torch.Tensor:
    """Reference-free CLIP-S (Hessel et al. 2021): w * max(cos(image, caption), 0), per pair. [N]"""
    with torch.no_grad():
        fi = clip.encode_image(images.to(clip.device))
        ft = clip.encode_text(clip.tokenize(list(captions)))
    return w * (fi * ft).sum(-1).clamp_min(0)


def load_language_model(name_or_dir: str = "gpt2-medium", device: str | torch.device = "cpu"):
    """GPT-2 (or any HF causal LM) by hub name or local dir; offline without a cache: a clear error at once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir)
        lm = AutoModelForCausalLM.from_pretrained(name_or_dir)
    except OSError as e:
        raise OSError(f"Could not load language model {name_or_dir!r} ({e.__class__.__name__}). Offline "
                      f"(HF_HUB_OFFLINE=1) it must be in the HF cache or a local folder saved with "
                      f"save_pretrained (config.json, model weights, tokenizer files).") from e
    return lm.to(device).eval(), tok


# ---- CLI: the `zerocap` subcommand of `xclip generate` ---------------------------------------------------------
#     xclip generate zerocap --config configs/zerocap/caption.yaml --images photos/ --out results/zerocap/caps.json
#     xclip generate zerocap --config configs/zerocap/arithmetic.yaml --arith_images a.jpg b.jpg c.jpg \
#         --arith_weights 1 1 -1
# The task presets of ZeroCapConfig.for_task are configs/zerocap/{caption,knowledge,ocr,arithmetic}.yaml.


def add_arguments(p) -> None:
    p.add_argument("--images", type=str, nargs="*", default=[], help="image files or folders to caption")
    p.add_argument("--lm", type=str, default="gpt2-medium", help="HF causal LM name or local dir (GPT-2 family)")
    p.add_argument("--backbone", type=str, default="ViT-B-32", help="CLIP architecture (open_clip name)")
    p.add_argument("--pretrained", type=str | None, default="openai", help="open_clip tag or local weights")
    p.add_argument("--arith_images", type=str, nargs="*", default=[],
                   help="images of an arithmetic target, e.g. A B C")
    p.add_argument("--arith_weights", type=float, nargs="*", default=[], help="their weights, e.g. 1 1 -1")
    p.add_argument("--arith_texts", type=str, nargs="*", default=[], help="text terms of an arithmetic target")
    p.add_argument("--arith_text_weights", type=float, nargs="*", default=[], help="their weights")
    p.add_argument("--references", type=str | None, default=None,
                   help="JSON {image file name: [reference captions]} for BLEU/CIDEr")
    p.add_argument("--out", type=str, default="results/zerocap/captions.json", help="output JSON file")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", type=bool, default=False, help="log a table of image + caption + CLIP-S")
    p.add_class_arguments(ZeroCapConfig, None)


def _image_files(paths: Sequence[str], flag: str = "--images") -> list[str]:
    from pathlib import Path

    from xclip.utils.images import IMAGE_EXTENSIONS, list_images

    out = []
    for p in paths:
        q = Path(p)
        if q.is_dir():
            found = [str(f) for f in list_images(q)]
            if not found:
                raise SystemExit(f"{flag} {p}: folder holds no {'/'.join(IMAGE_EXTENSIONS)} image; pass image files "
                                 f"or a folder of images")
            out += found
        elif q.is_file():
            out.append(str(q))
        else:
            raise SystemExit(f"{flag} {p}: image path not found; pass existing image files or folders")
    return out


def _check_images(files: Sequence[str], flag: str) -> None:
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - any decoder error means the file is unusable
            raise SystemExit(f"{flag}: {f} is not a readable image ({type(e).__name__}: {e}); remove or replace "
                             f"it") from None


def check_inputs(args) -> tuple[ZeroCapConfig, list[str], list[str]]:
    """Settings, images, references and the output file, before any model is loaded."""
    import json
    from pathlib import Path

    from xclip.generation._cli import check_device, check_file, check_out_file, dataclass_from

    cfg = dataclass_from(ZeroCapConfig, args)
    for flag, v in (("--beam_size", cfg.beam_size), ("--target_seq_length", cfg.target_seq_length),
                    ("--top_size", cfg.top_size)):
        if v < 1:
            raise SystemExit(f"{flag} {v}: must be >= 1")
    files = _image_files(args.images)
    arith = _image_files(args.arith_images, "--arith_images")
    if len(args.arith_weights) != len(arith):
        raise SystemExit(f"--arith_images gives {len(arith)} images but --arith_weights {len(args.arith_weights)} "
                         f"weights; give one weight per image (e.g. 1 1 -1)")
    if len(args.arith_text_weights) != len(args.arith_texts):
        raise SystemExit(f"--arith_texts gives {len(args.arith_texts)} texts but --arith_text_weights "
                         f"{len(args.arith_text_weights)} weights; give one weight per text")
    if not files and not arith and not args.arith_texts:
        raise SystemExit("nothing to caption: pass --images FILE_OR_FOLDER ..., or an arithmetic target "
                         "(--arith_images A B C --arith_weights 1 1 -1 and/or --arith_texts ... "
                         "--arith_text_weights ...)")
    _check_images(files, "--images")
    _check_images(arith, "--arith_images")
    if args.references:
        check_file(args.references, "--references", "reference-captions JSON")
        try:
            refs = json.loads(Path(args.references).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise SystemExit(f"--references {args.references}: not JSON ({e})") from None
        if not isinstance(refs, dict):
            raise SystemExit(f"--references {args.references}: expected {{image file name: [captions]}}, got "
                             f"{type(refs).__name__}")
        missing = [Path(f).name for f in files if Path(f).name not in refs]
        if missing:
            raise SystemExit(f"--references {args.references} has no references for {missing[:5]}; add them or "
                             f"drop --references")
    lm = Path(args.lm)
    if lm.exists() and not (lm / "config.json").is_file():
        raise SystemExit(f"--lm {lm}: folder without config.json; pass a folder written by save_pretrained or a "
                         f"hub name (e.g. gpt2-medium)")
    check_device(args.device)
    check_out_file(args.out)
    return cfg, files, arith


def run(args) -> dict:
    from PIL import Image
    from rich.progress import track

    from xclip.generation._cli import write_json
    from xclip.models.clip_backbone import build_clip

    cfg, files, arith = check_inputs(args)
    torch.manual_seed(args.seed)
    clip = build_clip(args.backbone, args.pretrained, device=args.device)
    lm, tok = load_language_model(args.lm, args.device)
    zc = ZeroCap(clip, lm, tok, cfg)

    def load(paths):
        return torch.stack([clip.preprocess(Image.open(f).convert("RGB")) for f in paths]).to(args.device)

    results = []
    summary = {"config": cfg.__dict__, "complete": False, "timing_s": zc.timing, "captions": results}
    if arith or args.arith_texts:
        imgs = load(arith) if arith else None
        target = zc.arithmetic_target(imgs, args.arith_weights, args.arith_texts, args.arith_text_weights)
        beams = zc.caption(target)
        results.append({"target": {"images": arith, "weights": args.arith_weights,
                                   "texts": args.arith_texts, "text_weights": args.arith_text_weights},
                        "caption": cfg.cond_text + beams[0].text, "beams": [b.__dict__ for b in beams]})
        write_json(summary, args.out)  # each finished caption is on disk at once
    for f in track(files, description="ZeroCap"):
        img = load([f])
        beams = zc.caption(zc.image_target(img))
        best = cfg.cond_text + beams[0].text
        results.append({"image": f, "caption": best, "clip_s": float(clip_s(clip, img, [best])[0]),
                        "beams": [b.__dict__ for b in beams]})
        write_json(summary, args.out)
    summary["timing_s"] = dict(zc.timing)
    if files:
        summary["clip_s"] = sum(r["clip_s"] for r in results if "clip_s" in r) / len(files)
    if args.references:
        summary["reference_metrics"] = reference_metrics(results, args.references)
    summary["complete"] = True
    write_json(summary, args.out)
    if args.wandb:
        import wandb

        from xclip.utils.wandb_setup import ensure_wandb_mode, log_images, wandb_image

        ensure_wandb_mode()
        run = wandb.init(project="xclip-zerocap", config=cfg.__dict__, job_type="caption")
        try:
            shown = [r for r in results if "image" in r]
            pictures = [Image.open(r["image"]).convert("RGB") for r in shown]  # pixels, not a path / placeholder
            captions = [f"{r['caption']} (CLIP-S {r['clip_s']:.3f})" for r in shown]
            table = wandb.Table(columns=["image", "caption", "clip_s"],
                                data=[[wandb_image(p, c), r["caption"], r["clip_s"]]
                                      for p, c, r in zip(pictures, captions, shown)])
            if pictures:  # the images with their captions also as a media panel (tables are artifacts in W&B)
                log_images(run, "captions/images", pictures, captions=captions)
            run.log({"captions": table, **({"clip_s": summary["clip_s"]} if "clip_s" in summary else {})})
        finally:
            run.finish()
    for r in results:
        print(f"{r.get('image', 'arithmetic')}: {r['caption']}")
    return summary


def reference_metrics(results: list[dict], references_json: str) -> dict:
    """BLEU-1..4 (torchmetrics) against references; CIDEr-D and METEOR too when pycocoevalcap is installed."""
    from pathlib import Path

    from torchmetrics.functional.text import bleu_score

    from xclip.utils.io import read_json

    refs = read_json(references_json, "--references file")
    preds, targets = [], []
    for r in results:
        if "image" not in r:
            continue
        key = Path(r["image"]).name
        if key not in refs:
            raise KeyError(f"{references_json} has no references for {key!r}")
        preds.append(r["caption"].lower())
        targets.append([t.lower() for t in refs[key]])
    out = {f"bleu{n}": float(bleu_score(preds, targets, n_gram=n)) for n in (1, 2, 3, 4)}
    try:
        from pycocoevalcap.cider.cider import Cider

        gts = {i: t for i, t in enumerate(targets)}
        res = {i: [p] for i, p in enumerate(preds)}
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    except ImportError:
        out["cider"] = None  # pip install pycocoevalcap for CIDEr-D / METEOR
    return out


def main(argv: list[str] | None = None) -> dict:
    import sys

    from xclip import generate as cli

    return cli.main(["zerocap", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
