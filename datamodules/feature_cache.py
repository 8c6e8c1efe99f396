"""Frozen CLIP features of the quintuples, computed once and cached on disk (DESIGN principle 3).

``cached_quintuple_features(backbone, dataset, cache_dir)`` returns a dict of tensors

    x_i, x_t, x_it, y_t: [N, d] float32, L2-normalised     class_id: [N] long     real: [N] bool
    class_text: [C, d] (the y_i prompts of every class)      class_word_image: [C, d] (class names rendered)
    words: list[str] (N)   classnames: list[str] (C)

y_i of a sample is ``class_text[class_id]`` (class-level, as in the released code). The file name is a hash of
the backbone spec + a fingerprint of its weights + the preprocessing + the dataset spec; files are written
atomically and loaded with weights_only=True. ``SpellingFeatureDataModule`` trains and validates on them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from xclip.datamodules.quintuples import QuintupleDataset, StyleConfig, WordConfig, make_image_source
from xclip.datamodules.resumable import ResumableLoader, is_distributed
from xclip.datamodules.text_render import DEFAULT_WORD_LIST, TextStyle, draw_word
from xclip.utils.io import atomic_torch_save, safe_torch_load

log = logging.getLogger(__name__)
CACHE_VERSION = 1
FEATURE_KEYS = ("x_i", "x_t", "x_it", "y_t", "class_id", "real", "class_text", "class_word_image")


# ---- cache key ------------------------------------------------------------------------------------------
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap fingerprint of a model's weights (shape, sum and first values of every tensor)."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        t = p.detach().float().flatten().cpu()
        h.update(f"{name}:{tuple(p.shape)}:{t.sum().item():.6e}:".encode())
        h.update(t[:16].numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(backbone, dataset_spec: dict[str, Any]) -> str:
    spec = {"version": CACHE_VERSION, "backbone": backbone.spec(), "weights": weights_fingerprint(backbone.model),
            "preprocess": repr(backbone.preprocess), "dataset": dataset_spec}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---- encoding -------------------------------------------------------------------------------------------
class _Preprocessed(Dataset):
    """Quintuple dataset -> (x_i, x_t, x_it preprocessed tensors, word, class id, real)."""

    def __init__(self, ds: QuintupleDataset, preprocess):
        self.ds, self.preprocess = ds, preprocess

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int):
        q = self.ds[idx]
        return (torch.stack([self.preprocess(q[e]) for e in ("x_i", "x_t", "x_it")]),   # [3, 3, H, W]
                q["y_t_text"], q["class_id"], q["real"])


def _collate(items):
    imgs, words, cls, real = zip(*items)   # words: the y_t texts (word_template applied)
    return torch.stack(imgs), list(words), torch.tensor(cls), torch.tensor(real, dtype=torch.bool)


@torch.no_grad()
def encode_texts(backbone, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """list of N strings -> [N, d] normalised."""
    out = [backbone.encode_text(backbone.tokenize(list(texts[i:i + batch_size])), normalize=True).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def class_feature_matrices(backbone, dataset: QuintupleDataset) -> dict[str, torch.Tensor]:
    """class_text [C, d]: mean of each class's prompt embeddings, renormalised; class_word_image [C, d]: the
    class name rendered on a blank canvas (the image-to-image classifier of 5.2)."""
    from xclip.models.zero_shot import prompt_classifier

    class_text = prompt_classifier(backbone, dataset.class_prompts()).float().cpu()   # [C, d]
    canvas = max(dataset.canvas_size, 224)      # long class names fit; preprocess resizes to the model's input
    size = round(dataset.font_size * canvas / dataset.canvas_size)
    style = TextStyle(font=dataset.fonts[0], size=size, fill=tuple(dataset.style.colour))
    imgs = [draw_word(None, c.replace("_", " "), style, random.Random(0), canvas)[0] for c in dataset.classnames]
    return {"class_text": class_text, "class_word_image": backbone.encode_pil(imgs)}


@torch.no_grad()
def encode_quintuples(backbone, dataset: QuintupleDataset, batch_size: int = 64, num_workers: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """All five elements of every quintuple through the frozen backbone, batched, no grad."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    loader = DataLoader(_Preprocessed(dataset, backbone.preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate)
    cols: dict[str, list] = {k: [] for k in ("x_i", "x_t", "x_it", "y_t", "class_id", "real")}
    words: list[str] = []
    with Progress(TextColumn(f"encoding {dataset.split} quintuples"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("enc", total=len(dataset))
        for imgs, batch_words, cls, real in loader:
            b = imgs.shape[0]
            z = backbone.encode_image(imgs.flatten(0, 1).to(backbone.device), normalize=True)  # [3B, d]
            z = z.float().cpu().view(b, 3, -1)
            cols["x_i"].append(z[:, 0])
            cols["x_t"].append(z[:, 1])
            cols["x_it"].append(z[:, 2])
            cols["y_t"].append(encode_texts(backbone, batch_words))
            cols["class_id"].append(cls)
            cols["real"].append(real)
            words += batch_words
            bar.advance(task, b)
    out: dict[str, Any] = {k: torch.cat(v) for k, v in cols.items()}
    out.update(class_feature_matrices(backbone, dataset))
    out["words"] = words
    out["classnames"] = dataset.classnames
    return out


def cached_quintuple_features(backbone, dataset: QuintupleDataset, cache_dir: str | Path | None,
                              batch_size: int = 64, num_workers: int = 0, progress: bool = True
                              ) -> dict[str, Any]:
    """Load the features of ``dataset`` from ``cache_dir`` or compute and store them (None: no cache)."""
    if cache_dir is None:
        return encode_quintuples(backbone, dataset, batch_size, num_workers, progress)
    key = cache_key(backbone, dataset.spec())
    path = Path(cache_dir) / f"quintuples-{dataset.split}-{key}.pt"
    if path.is_file():
        feats = safe_torch_load(path, "feature cache")
        missing = [k for k in FEATURE_KEYS if k not in feats]
        if not missing and len(feats["x_i"]) == len(dataset):
            log.info("feature cache hit: %s", path)
            return feats
        log.warning("feature cache %s is incomplete (missing %s); recomputing", path, missing)
    feats = encode_quintuples(backbone, dataset, batch_size, num_workers, progress)
    atomic_torch_save(feats, path)
    log.info("wrote feature cache %s (%d quintuples)", path, len(dataset))
    return feats


# ---- datasets / datamodule over cached features ---------------------------------------------------------
class CachedQuintupleFeatures(Dataset):
    """Item idx -> {x_i, y_i, x_t, y_t, x_it: [d], class_id, real} from a cached feature dict."""

    def __init__(self, feats: dict[str, Any]):
        self.f = feats

    def __len__(self) -> int:
        return len(self.f["class_id"])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        f, c = self.f, self.f["class_id"][idx]
        return {"x_i": f["x_i"][idx], "y_i": f["class_text"][c], "x_t": f["x_t"][idx], "y_t": f["y_t"][idx],
                "x_it": f["x_it"][idx], "class_id": c, "real": f["real"][idx]}


class CachedFeatureDataModule(pl.LightningDataModule):
    """Batches of quintuple features from feature dicts already in memory (``train_features``/``val_features``).

    ``val_class_features`` = {"class_text", "class_word_image"} of the validation split (SpellingProjection's
    validation reads it)."""

    def __init__(self, train_features: dict[str, Any] | None = None, val_features: dict[str, Any] | None = None,
                 batch_size: int = 128, shuffle_seed: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.shuffle_seed = shuffle_seed  # None: the run's seed_everything seed (datamodules/resumable.py)
        self.train_features = train_features
        self.val_features = val_features
        self.val_class_features = None if val_features is None else _class_feats(val_features)

    def train_dataloader(self) -> DataLoader:
        # The order is a function of (seed, epoch) only -- not of the global RNG, which computing the feature
        # cache consumes (a cache hit and a miss gave different results) -- and resumes mid-epoch.
        ds = CachedQuintupleFeatures(self.train_features)
        if is_distributed(self):
            return DataLoader(ds, batch_size=self.batch_size, shuffle=True, num_workers=0)
        return ResumableLoader(ds, batch_size=self.batch_size, shuffle=True, seed=self.shuffle_seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(CachedQuintupleFeatures(self.val_features), batch_size=self.batch_size,
                          shuffle=False, num_workers=0)


def _class_feats(feats: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: feats[k] for k in ("class_text", "class_word_image") if k in feats}


class SpellingFeatureDataModule(CachedFeatureDataModule):
    """Quintuples -> cached frozen-CLIP features -> batches of features for SpellingProjection.

    The backbone is the method's own, given by ``connect(model, datamodule)`` (``xclip train`` calls it), so the
    features always match the model; standalone use builds ``encoder``/``encoder_pretrained``.

    Args:
        source / val_source: "synthetic-world", "hf:NAME" or an image folder (val_source None -> source).
        train_split / val_split: HF split names for hf: sources (ImageNet: "train" / "validation").
        n_train / n_val: number of quintuples; seed: the seed of every per-sample draw.
        canvas_size: image side in px on which words are drawn (None -> the backbone's input size).
        real_fraction, word_list ("world" = the world's vocabulary), real_min_len, real_max_len,
        nonsense_min_len, nonsense_max_len: words (2.3); word_template: text encoded as y_t ("{}" = bare word).
        fonts, font_size, text_colour, position, white_box, random_font, font_size_jitter: rendering (2.4);
        native_text: let a source with its own word rendering (the world) draw x_it.
        class_templates: prompt templates for y_i ("{}" = class name; None -> "an image of a/an {class}", or
        the world's prompt ensemble for the world).
        cache_dir: where features are stored (None: recompute every time).
    """

    def __init__(self, source: str = "synthetic-world", val_source: str | None = None,
                 class_index: str | None = None, train_split: str = "train", val_split: str = "validation",
                 n_train: int = 10000, n_val: int = 1000, seed: int = 0, canvas_size: int | None = None,
                 real_fraction: float = 0.5, word_list: str = DEFAULT_WORD_LIST, real_min_len: int = 3,
                 real_max_len: int = 8, nonsense_min_len: int = 3, nonsense_max_len: int = 5,
                 word_template: str = "{}", fonts: list[str] | None = None, font_size: int | None = None,
                 text_colour: tuple[int, int, int] = (0, 0, 0), position: str = "center", white_box: bool = False,
                 random_font: bool = False, font_size_jitter: float = 0.0, native_text: bool = True,
                 class_templates: list[str] | None = None, cache_dir: str | None = "cache/spelling",
                 batch_size: int = 128, encode_batch_size: int = 64, num_workers: int = 0,
                 encoder: str | None = None, encoder_pretrained: str | None = None, progress: bool = True):
        super().__init__(batch_size=batch_size)
        self.save_hyperparameters()
        if position not in ("center", "random"):
            raise ValueError(f"position must be 'center' or 'random', got {position!r}.")

    def use_backbone(self, backbone) -> None:
        """The method's frozen CLIP, given by ``connect(model, datamodule)`` (``xclip train`` calls it), so the
        cached features always match the model; the datamodule never reads ``trainer.lightning_module``."""
        self._given_backbone = backbone

    def _backbone(self):
        if getattr(self, "_given_backbone", None) is not None:
            return self._given_backbone
        if self.hparams.encoder is None:
            raise ValueError("SpellingFeatureDataModule needs a CLIP: connect it to the method "
                             "(xclip.connect(model, datamodule); xclip train does this) or set `encoder` (a "
                             "backbone name) and `encoder_pretrained`.")
        from xclip.models.clip_backbone import build_clip

        self._own_backbone = getattr(self, "_own_backbone", None) or build_clip(
            self.hparams.encoder, self.hparams.encoder_pretrained).freeze()
        return self._own_backbone

    def build_dataset(self, split: str, canvas_size: int) -> QuintupleDataset:
        h = self.hparams
        src_name = h.source if split == "train" or h.val_source is None else h.val_source
        source = make_image_source(src_name, h.train_split if split == "train" else h.val_split, h.class_index)
        words = WordConfig(h.real_fraction, h.word_list, h.real_min_len, h.real_max_len, h.nonsense_min_len,
                           h.nonsense_max_len, word_template=h.word_template)
        style = StyleConfig(h.fonts, h.font_size, tuple(h.text_colour), h.position, h.white_box, h.random_font,
                            h.font_size_jitter, h.native_text)
        return QuintupleDataset(source, split, h.n_train if split == "train" else h.n_val, h.seed, canvas_size,
                                words, style, h.class_templates)

    def features(self, split: str) -> dict[str, Any]:
        backbone = self._backbone()
        ds = self.build_dataset(split, self.hparams.canvas_size or backbone.image_size)
        return cached_quintuple_features(backbone, ds, self.hparams.cache_dir, self.hparams.encode_batch_size,
                                         self.hparams.num_workers, self.hparams.progress)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_features is None:
            self.train_features = self.features("train")
        if stage in (None, "fit", "validate") and self.val_features is None:
            self.val_features = self.features("val")
            self.val_class_features = _class_feats(self.val_features)
