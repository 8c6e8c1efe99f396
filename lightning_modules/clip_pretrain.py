"""Contrastive pretraining of a (tiny) open_clip CLIP on the built-in synthetic world.

    python train.py fit --config configs/world/pretrain_tiny_clip.yaml
    python -m xclip.lightning_modules.clip_pretrain export runs/world_pretrain/checkpoints/last.ckpt   # -> checkpoints/

Unlike the methods on a frozen backbone, everything here is learned, so the Lightning checkpoint keeps the full
CLIP. ``export_clip_weights`` turns it into the shipped open_clip state dict (fp16) that
``build_clip("tiny-vit-world", "synthetic-world")`` loads, plus a model card.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from xclip.datamodules.synthetic_world import SHAPES, class_prompts, word_prompt
from xclip.models.clip_backbone import REPO_ROOT, build_clip
from xclip.models.zero_shot import prompt_classifier
from xclip.utils.io import atomic_torch_save, atomic_write_bytes, read_json, safe_torch_load

MODEL_PREFIX = "clip.model."


class ClipPretrain(pl.LightningModule):
    """CLIP trained from scratch with open_clip's ClipLoss (all-gather with gradients under DDP)."""

    def __init__(self, model_name: str = "tiny-vit-world", lr: float = 1e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 200, max_steps: int = 2000, beta1: float = 0.9, beta2: float = 0.98,
                 eps: float = 1e-6, min_lr_ratio: float = 0.0, init_seed: int = 0, letter_loss_weight: float = 0.0):
        """``letter_loss_weight`` > 0 adds an auxiliary loss (issue 18 reading experiments): a linear head on each
        tower's normalised embedding predicts which letters the item's written word contains (26 binary targets,
        items with a word only); the heads are not part of the exported CLIP."""
        super().__init__()
        self.save_hyperparameters()
        if warmup_steps < 0 or max_steps < 1 or letter_loss_weight < 0:
            raise ValueError(f"warmup_steps and letter_loss_weight must be >= 0 and max_steps >= 1 (got "
                             f"{warmup_steps}, {letter_loss_weight}, {max_steps}).")
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)  # weights depend on init_seed only, not on the caller's RNG state
            self.clip = build_clip(model_name)
            if letter_loss_weight > 0:
                dim = self.clip.model.text_projection.shape[1]
                self.letter_heads = torch.nn.ModuleDict({"image": torch.nn.Linear(dim, 26),
                                                         "text": torch.nn.Linear(dim, 26)})
        self.clip.model.train()
        self.loss_fn: ClipLoss | None = None
        self._t0 = time.time()

    # ---- training -----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        world_size = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank,
                                world_size=world_size)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        img = self.clip.encode_image(images, normalize=True)   # [B, D]
        txt = self.clip.encode_text(tokens, normalize=True)    # [B, D]
        return img, txt

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.loss_fn is None:
            self.setup("fit")
        tokens = self.clip.tokenize(batch["caption"])          # [B, L]
        img, txt = self(batch["image"], tokens)
        scale = self.clip.model.logit_scale.exp()
        loss = self.loss_fn(img, txt, scale)
        self.log("train/loss", loss, prog_bar=True)
        if self.hparams.letter_loss_weight > 0:
            aux = letter_loss(self.letter_heads, img, txt, batch["word"])
            self.log("train/letter_loss", aux)
            loss = loss + self.hparams.letter_loss_weight * aux
        self.log("train/logit_scale", scale, prog_bar=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # as in CLIP: the temperature is clamped at 100
            self.clip.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        decay, no_decay = [], []
        if self.hparams.letter_loss_weight > 0:
            no_decay += list(self.letter_heads.parameters())
        for n, p in self.clip.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "logit_scale" in n or "positional_embedding" in n
             or "class_embedding" in n else decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, hp.warmup_steps, hp.max_steps,
                                                                               hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation: zero-shot shape accuracy, accuracy under wrong words, word reading --------------------
    def on_validation_epoch_start(self) -> None:
        self._val: dict[str, list[torch.Tensor]] = {"img": [], "label": [], "kind": [], "words": []}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        img = self.clip.encode_image(batch["image"], normalize=True)
        self._val["img"].append(img)
        self._val["label"].append(batch["label"])
        self._val["kind"].extend(batch["kind"])
        self._val["words"].extend(batch["word"])

    def on_validation_epoch_end(self) -> None:
        img = torch.cat(self._val["img"])      # [N, D]
        labels = torch.cat(self._val["label"])  # [N]
        kinds = self._val["kind"]
        with torch.no_grad():
            cls = prompt_classifier(self.clip, [class_prompts(s) for s in SHAPES])   # [C, D]
            pred = (img @ cls.t()).argmax(-1)
        for kind, name in (("object", "val/zero_shot_acc"), ("object_word", "val/object_word_acc")):
            m = torch.tensor([k == kind for k in kinds], device=img.device)
            if m.any():
                self.log(name, (pred[m] == labels[m]).float().mean(), prog_bar=kind == "object")
        wm = [i for i, k in enumerate(kinds) if k == "word"]
        if wm:
            words = [self._val["words"][i] for i in wm]
            uniq = sorted(set(words))
            with torch.no_grad():
                t = self.clip.encode_text(self.clip.tokenize([word_prompt(w) for w in uniq]), normalize=True)
            wp = (img[wm] @ t.t()).argmax(-1).tolist()
            self.log("val/word_top1", sum(uniq[j] == w for j, w in zip(wp, words)) / len(words), prog_bar=True)
        self.log("val/wall_minutes", (time.time() - self._t0) / 60)


def letter_targets(words: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Words -> (has_word [B] bool, letters [n, 26] float: 1 where letter a..z occurs), n = has_word.sum()."""
    has = torch.tensor([bool(w) for w in words])
    rows = [[float(chr(97 + k) in w.lower()) for k in range(26)] for w in words if w]
    return has, torch.tensor(rows).view(-1, 26)


def letter_loss(heads: torch.nn.ModuleDict, img: torch.Tensor, txt: torch.Tensor, words: list[str]) -> torch.Tensor:
    """Bag-of-letters BCE of both towers' normalised embeddings ([B, D] each) on the items with a word."""
    has, target = letter_targets(words)
    if not bool(has.any()):
        return img.sum() * 0.0
    has = has.to(img.device)
    target = target.to(img.device)
    return sum(F.binary_cross_entropy_with_logits(heads[k](e[has] * 10.0), target)   # x10: unit vectors -> logits
               for k, e in (("image", img), ("text", txt)))


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepDelay(pl.Callback):
    """Sleeps ``delay_s`` after every training batch: makes tiny runs slow enough to kill mid-epoch (resume tests)."""

    def __init__(self, delay_s: float = 0.2):
        super().__init__()
        self.delay_s = float(delay_s)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.delay_s)


# ---- export ---------------------------------------------------------------------------------------------
DEFAULT_EXPORT = REPO_ROOT / "checkpoints" / "tiny_clip_world.pt"


def clip_state_from_checkpoint(ckpt_path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Lightning checkpoint of ClipPretrain -> (open_clip state dict, checkpoint metadata)."""
    ckpt = safe_torch_load(ckpt_path, "ClipPretrain checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RuntimeError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict').")
    state = {k[len(MODEL_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    if not state:
        raise RuntimeError(f"{ckpt_path} holds no '{MODEL_PREFIX}*' tensors: not a ClipPretrain checkpoint.")
    meta = {"global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
            "hyper_parameters": dict(ckpt.get("hyper_parameters", {}))}
    return state, meta


def export_clip_weights(ckpt_path: str | Path, out: str | Path = DEFAULT_EXPORT, card: dict | None = None,
                        fp16: bool = True) -> Path:
    """Write the CLIP of a ClipPretrain checkpoint as an open_clip state dict (fp16 floats, atomic) + a .md card."""
    state, meta = clip_state_from_checkpoint(ckpt_path)
    if fp16:
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out = Path(out)
    atomic_torch_save(state, out)
    info = {"source_checkpoint": str(ckpt_path), **meta, **(card or {})}
    atomic_write_bytes(out.with_suffix(".md"), render_card(info).encode())
    return out


def render_card(info: dict[str, Any]) -> str:
    lines = ["# tiny_clip_world.pt", "",
             "A tiny open_clip CLIP (`tiny-vit-world`) pretrained from scratch on the built-in synthetic world "
             "(datamodules/synthetic_world.py) by `python train.py fit --config configs/world/pretrain_tiny_clip.yaml`,"
             " exported with `python -m xclip.lightning_modules.clip_pretrain export <last.ckpt>` (fp16 state dict; "
             "`build_clip('tiny-vit-world', 'synthetic-world')` loads it into the fp32 model).", "",
             "```json", json.dumps(info, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export a ClipPretrain checkpoint as the shipped tiny CLIP.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("ckpt")
    e.add_argument("--out", default=str(DEFAULT_EXPORT))
    e.add_argument("--card_json", default=None, help="JSON file with extra card fields (metrics, wall time, ...)")
    e.add_argument("--fp32", action="store_true")
    args = p.parse_args(argv)
    card = read_json(args.card_json, "--card_json file") if args.card_json else None
    out = export_clip_weights(args.ckpt, args.out, card=card, fp16=not args.fp32)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
