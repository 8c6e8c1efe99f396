"""CoOp (Zhou et al., IJCV 2022) on a frozen CLIP, optionally with NTLB's explainability loss (spec §2, §3).

    python train.py fit --config configs/coop/imagenet_16shot.yaml
    python train.py fit --config configs/coop/imagenet_1shot_expl.yaml        # + lambda * L_expl

Only the prompt context is trained and saved.  Class names come from ``classnames`` / ``classnames_file`` or,
when both are unset, from the datamodule through ``connect(model, datamodule)`` (``xclip train`` calls it); they are then written into
the checkpoint's hyperparameters so ``load_method_checkpoint`` rebuilds the same prompts.

CoOp's released prompt files (``prompt_learner/model.pth.tar-N``) are read safely by
``models.prompt_learner.read_dassl_prompt_checkpoint``: ``load_coop_prompt_checkpoint`` turns one into a CoOp module
for evaluation, and ``init_ctx_from: PATH`` starts training from one.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from xclip.lightning_modules.base import FrozenBackboneModule
from xclip.models.prompt_learner import (
    DasslPromptCheckpoint,
    PromptLearner,
    check_prompt_file_backbone,
    read_dassl_prompt_checkpoint,
)

log = logging.getLogger(__name__)
RELEVANCE_IMAGES = 4  # validation images whose relevance overlay goes to W&B each validation epoch


def warmup_cosine_factor(epoch: int, lr: float, max_epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's schedule as a LambdaLR factor: constant ``warmup_lr`` for the warm-up epochs, then cosine over
    ``max_epochs`` restarted at 0 after the warm-up (WARMUP_RECOUNT=True)."""
    if epoch < warmup_epochs:
        return warmup_lr / lr
    t = epoch - warmup_epochs
    return 0.5 * (1.0 + math.cos(math.pi * min(t, max_epochs) / max(max_epochs, 1)))


CLASS_TOKEN_POSITION_RE = re.compile(r"_ctp(end|middle|front)(?:/|$)")


class CoOp(FrozenBackboneModule):
    """Learnable prompt context + CE over the classes (+ ``expl_weight`` * NTLB loss)."""

    def __init__(self, backbone: str = "tiny-vit-world", pretrained: str | None = "synthetic-world",
                 classnames: list[str] | None = None, classnames_file: str | None = None,
                 n_ctx: int | None = 16, ctx_init: str = "", csc: bool = False, class_token_position: str = "end",
                 lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, max_epochs: int | None = None,
                 warmup_epochs: int = 1, warmup_lr: float = 1e-5,
                 expl_weight: float = 0.0, also_minimize: bool = True, expl_start_layer: int = 0,
                 expl_score: str = "logit", expl_chunk_size: int | None = None,
                 log_relevance_every_n_epochs: int = 0, init_ctx_from: str | None = None):
        """``init_ctx_from``: a CoOp prompt file (``.../prompt_learner/model.pth.tar-N``) whose context starts the
        training; it sets ``n_ctx`` and ``csc`` from the file's ctx shape (``ctx_init`` must then be empty), and
        the file's SOS embedding must match the backbone's.  The checkpoint records the path under
        ``_init_ctx_from`` (informational) and does not need the file again."""
        super().__init__(backbone, pretrained)
        if classnames_file and not classnames:
            path = Path(classnames_file)
            if not path.is_file():
                raise FileNotFoundError(f"CoOp classnames_file not found: {path}")
            classnames = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if expl_weight < 0:
            raise ValueError(f"expl_weight must be >= 0, got {expl_weight}.")
        if expl_score not in ("logit", "cosine"):
            raise ValueError(f"expl_score must be 'logit' (anchor) or 'cosine', got {expl_score!r}.")
        self.save_hyperparameters()
        self.hparams["classnames"] = list(classnames) if classnames else None
        self.prompt_learner: PromptLearner | None = None
        self._init_prompt: DasslPromptCheckpoint | None = None
        if init_ctx_from:
            self._adopt_prompt_file(read_dassl_prompt_checkpoint(init_ctx_from))
        if classnames:
            self._build_prompts(classnames)

    # ---- prompts -------------------------------------------------------------------------------------------------
    def _adopt_prompt_file(self, ckpt: DasslPromptCheckpoint) -> None:
        """Take n_ctx / csc from a CoOp prompt file; its ctx is copied in when the prompts are built."""
        h = self.hparams
        if h.ctx_init:
            raise ValueError(f"init_ctx_from={str(ckpt.path)!r} and ctx_init={h.ctx_init!r} both initialise the "
                             f"context; give one of them.")
        check_prompt_file_backbone(ckpt, self.backbone)
        if (h.n_ctx, h.csc) != (ckpt.n_ctx, ckpt.csc):
            log.info("init_ctx_from %s: n_ctx=%d csc=%s from the file (config said n_ctx=%s csc=%s)", ckpt.path,
                     ckpt.n_ctx, ckpt.csc, h.n_ctx, h.csc)
        self.hparams["n_ctx"], self.hparams["csc"] = ckpt.n_ctx, ckpt.csc
        self.hparams["init_ctx_from"] = None  # consumed: a checkpoint of this run rebuilds without the file
        self.hparams["_init_ctx_from"] = str(ckpt.path)
        self._init_prompt = ckpt
        log.info("CoOp context from %s (epoch %s, stored as %s): ctx %s", ckpt.path, ckpt.epoch,
                 ckpt.stored_dtype, tuple(ckpt.ctx.shape))

    def _build_prompts(self, classnames: Sequence[str]) -> None:
        h = self.hparams
        self.prompt_learner = PromptLearner(self.backbone, list(classnames), n_ctx=h.n_ctx if not h.ctx_init else None,
                                            ctx_init=h.ctx_init, csc=h.csc,
                                            class_token_position=h.class_token_position).to(self.device)
        self.hparams["classnames"] = list(classnames)
        if self._init_prompt is not None:
            ctx = self._init_prompt.ctx
            if ctx.shape != self.prompt_learner.ctx.shape:
                raise ValueError(f"{self._init_prompt.path}: class-specific ctx {tuple(ctx.shape)} does not fit "
                                 f"{len(classnames)} classes ({list(classnames)[:3]}...).")
            with torch.no_grad():
                self.prompt_learner.ctx.copy_(ctx.to(self.prompt_learner.ctx))

    def use_data(self, classnames: Sequence[str] | None = None, image_size: int | None = None) -> None:
        """What the datamodule tells the method, given by ``connect(model, datamodule)`` (``xclip train`` calls it
        once both are built; the module never reads ``trainer.datamodule``): its class names build the prompts
        when the config gave none, and must equal the config's when it did; its image size must be the CLIP's."""
        names = list(classnames or [])
        if self.prompt_learner is None and names:
            self._build_prompts(names)
        elif names and [c.replace("_", " ").strip() for c in names] != self.prompt_learner.classnames:
            raise ValueError(f"CoOp class names ({len(self.prompt_learner.classnames)}: "
                             f"{self.prompt_learner.classnames[:3]}...) differ from the datamodule's "
                             f"({len(names)}: {names[:3]}...).")
        if image_size is not None and int(image_size) != self.backbone.image_size:
            raise ValueError(f"datamodule image_size={image_size} but backbone {self.backbone.name!r} expects "
                             f"{self.backbone.image_size}; set data.init_args.image_size.")

    def setup(self, stage: str) -> None:
        if self.prompt_learner is None:
            raise ValueError("CoOp has no class names: set model.classnames / model.classnames_file, or pass the "
                             "datamodule's with xclip.connect(model, datamodule) (xclip train does this).")

    def _prompts(self) -> PromptLearner:
        if self.prompt_learner is None:
            raise RuntimeError("CoOp prompts are not built yet (no class names; see setup()).")
        return self.prompt_learner

    def class_text_features(self, classnames: Sequence[str] | None = None) -> torch.Tensor:
        """[C, D] L2-normalised text features of the learned prompts for ``classnames`` (evaluation API)."""
        if self.prompt_learner is None and classnames and self._init_prompt is not None:
            self._build_prompts(classnames)  # a CoOp prompt file loaded without class names (evaluate.py)
        return self._prompts().text_features(classnames, normalize=True)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] normalised (frozen tower, once per image)."""
        return self.backbone.encode_image(images, normalize=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """-> logits [B, C] = logit_scale * cos(image, prompt)."""
        return self.backbone.logit_scale * self.image_features(images) @ self.class_text_features().T

    # ---- training ------------------------------------------------------------------------------------------------
    def compute_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        pl_ = self._prompts()
        img = self.image_features(images)  # [B, D]
        out: dict[str, torch.Tensor] = {}
        text_feats = None
        if self.hparams.expl_weight > 0:
            from xclip.losses.explainability import coop_expl_loss

            embeds, eot = pl_()  # [C, L, W], [C]
            expl, scores, text_feats = coop_expl_loss(
                self.backbone, img, embeds, eot, pl_.name_mask, labels,
                also_minimize=self.hparams.also_minimize, start_layer=self.hparams.expl_start_layer,
                score=self.hparams.expl_score, chunk_size=self.hparams.expl_chunk_size, params=[pl_.ctx])
            out["expl"] = expl
            out["gt_score"] = scores.gather(1, labels[:, None]).mean()
        if text_feats is None:
            text_feats = pl_.text_features(normalize=False)
        logits = self.backbone.logit_scale * img @ F.normalize(text_feats, dim=-1).T  # [B, C]
        out["ce"] = F.cross_entropy(logits, labels)
        out["acc"] = (logits.argmax(-1) == labels).float().mean()
        out["loss"] = out["ce"] + self.hparams.expl_weight * out["expl"] if "expl" in out else out["ce"]
        return out

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if batch_idx == 0:
            self._shown = (images[:4].detach(), labels[:4].detach())  # the images the relevance table shows
        out = self.compute_losses(images, labels)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True, batch_size=len(labels))
        return out["loss"]

    def _eval_step(self, batch, prefix: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log_dict({f"{prefix}/acc": (logits.argmax(-1) == labels).float().mean(),
                       f"{prefix}/ce": F.cross_entropy(logits, labels)}, batch_size=len(labels), sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self._log_relevance_overlays(*batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        max_epochs = h.max_epochs or (self._trainer.max_epochs if self._trainer is not None else None)
        if not max_epochs or max_epochs < 0:
            max_epochs = 50  # CoOp's ImageNet setting when neither the model nor the trainer says
        opt = torch.optim.SGD([self._prompts().ctx], lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: warmup_cosine_factor(e, h.lr, max_epochs, h.warmup_epochs, h.warmup_lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ---- relevance pictures in W&B (validation) -----------------------------------------------------------------
    def _log_relevance_overlays(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """W&B: Chefer image relevance of the first RELEVANCE_IMAGES validation images for their true class's
        learned prompt, overlaid on the image (models/relevance_viz.py), captioned with the true / predicted class."""
        from pytorch_lightning.loggers import WandbLogger

        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self.trainer.is_global_zero:
            return
        try:
            pictures, captions = self.relevance_overlays(images[:RELEVANCE_IMAGES], labels[:RELEVANCE_IMAGES])
            from xclip.utils.wandb_setup import log_images

            log_images(loggers, "val/relevance", pictures, captions=captions)
        except Exception as e:  # visualisation must never kill a run
            log.warning("relevance overlays skipped: %s: %s", type(e).__name__, e)

    def relevance_overlays(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[list, list[str]]:
        """([B, 3, H, W] CLIP-normalised, [B]) -> (B PIL overlays of the image relevance for the true class's
        prompt, B captions "true: ... | pred: ...").  Runs with gradients also inside Lightning's inference mode."""
        from xclip.models.relevance import image_relevance, patch_grid
        from xclip.models.relevance_viz import overlay_relevance

        pl_ = self._prompts()
        with torch.inference_mode(False), torch.enable_grad():
            x, y = images.detach().clone(), labels.detach().clone()  # inference tensors cannot enter autograd
            text = self.class_text_features().detach().clone()  # [C, D]
            logits = self.backbone.logit_scale.detach() * self.image_features(x) @ text.T  # [B, C]
            rel = image_relevance(self.backbone, x, text_features=text[y])  # [B, B, N]
        idx = torch.arange(len(y), device=rel.device)
        maps = rel[idx, idx].reshape(len(y), *patch_grid(self.backbone)).float().cpu()  # [B, h, w]
        mean = torch.tensor(self.backbone.mean).view(3, 1, 1)
        std = torch.tensor(self.backbone.std).view(3, 1, 1)
        pixels = (x.detach().float().cpu() * std + mean).clamp(0, 1)  # [B, 3, H, W] in [0, 1]
        pred = logits.argmax(-1).tolist()
        names = pl_.classnames
        pictures = [overlay_relevance(pixels[i], maps[i]) for i in range(len(y))]
        captions = [f"true: {names[int(y[i])]} | pred: {names[pred[i]]}" for i in range(len(y))]
        return pictures, captions

    # ---- optional relevance visualisation ------------------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        every = self.hparams.log_relevance_every_n_epochs
        if not every or (self.current_epoch + 1) % every or not self.trainer.is_global_zero:
            return
        if importlib.util.find_spec("xclip.models.relevance_viz") is None:
            return
        try:
            self._log_relevance_table()
        except Exception as e:  # visualisation must never kill a run
            log.warning("relevance visualisation skipped: %s: %s", type(e).__name__, e)

    def _log_relevance_table(self) -> None:
        """W&B table of the class-name share of the EOT relevance for a few training images."""
        from pytorch_lightning.loggers import WandbLogger

        from xclip.losses.explainability import classname_scores
        from xclip.models.relevance import text_relevance_from_embeddings

        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        if getattr(self, "_shown", None) is None:
            return
        images, labels = self._shown
        pl_ = self._prompts()
        embeds, eot = pl_()
        rel, _ = text_relevance_from_embeddings(self.backbone, self.image_features(images), embeds.detach(), eot)
        scores = classname_scores(rel.detach(), eot, pl_.name_mask)  # [b, C]
        rows = [[int(y), pl_.classnames[int(y)], float(scores[i, y])] for i, y in enumerate(labels)]
        loggers[0].log_table("coop/classname_relevance", columns=["label", "class", "gt_score"], data=rows)


def load_coop_prompt_checkpoint(path: str | Path, backbone: str, pretrained: str | None,
                                classnames: Sequence[str] | None = None,
                                class_token_position: Literal["end", "middle", "front"] | None = None,
                                map_location: str | torch.device = "cpu") -> CoOp:
    """A CoOp module (eval mode) holding the context of CoOp's released prompt file ``path``.

    The file records neither the backbone nor the class names (CoOp drops its token_prefix/suffix on load and
    rebuilds them from the current class names): give the CLIP it was trained on (``ViT-B-32``/``openai`` for
    ``vit_b32_*`` folders...; a wrong one fails on the SOS-embedding check).  ``classnames`` may stay None for a
    generic context (the prompts are built for whatever names ``class_text_features`` gets); a class-specific
    one needs the training classes in order.  ``class_token_position`` None reads CoOp's ``_ctp<pos>`` folder
    name (``nctx16_cscFalse_ctpend``) and falls back to ``end``.
    """
    if not backbone:
        raise ValueError(f"{path} is a CoOp prompt file, which does not record its CLIP: give the backbone and "
                         f"pretrained tag it was trained with (e.g. --backbone ViT-B-32 --pretrained openai).")
    if class_token_position is None:
        m = CLASS_TOKEN_POSITION_RE.search(Path(path).resolve().as_posix())
        class_token_position = m.group(1) if m else "end"
        log.info("class_token_position=%s (%s)", class_token_position,
                 "from the folder name" if m else "CoOp's default; the file does not record it")
    ckpt = read_dassl_prompt_checkpoint(path)
    if classnames is None and ckpt.csc:
        raise ValueError(f"{path} holds class-specific contexts for {ckpt.n_cls} classes: give their class names "
                         f"in training order.")
    if classnames is not None and ckpt.n_cls is not None and len(classnames) != ckpt.n_cls:
        log.info("%s was trained on %d classes; prompting %d class names", path, ckpt.n_cls, len(classnames))
    module = CoOp(backbone, pretrained, classnames=None, n_ctx=ckpt.n_ctx, csc=ckpt.csc,
                  class_token_position=class_token_position)
    module._adopt_prompt_file(ckpt)
    if classnames:
        module._build_prompts(list(classnames))
    return module.to(map_location).eval()
