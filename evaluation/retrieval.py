"""Retrieval on synthetic quintuples (disentangle.md 5.1) and, optionally, on a captioned image folder.

For ``--retrieval.n`` quintuples (x_i, y_i, x_t, y_t, x_it) of ``datamodules.quintuples.QuintupleDataset``:
* ``zero_shot/acc_im_i_txt_i`` / ``acc_im_it_txt_i``: top-1 of x_i / x_it among the class prompts;
* ``image_text/{i2t,t2i}_top{1,5}``: x_i <-> its class prompt y_i (same-class items are mutually relevant);
* ``{real,fake}/{task}/{img2txt,txt2img}_top{1,5}`` for the tasks im_t_txt_t (x_t<->y_t), im_it_img_t
  (x_it<->x_t), im_it_img_i (x_it<->x_i), im_it_txt_t (x_it<->y_t); img2txt = first -> second (argmax per row).
Repeated words in a gallery: by default copies of the same word are mutually relevant; with
``--retrieval.strict_duplicates true`` every copy is distinct, so a repeated word counts as an error whenever the
other copy wins (the released code's behaviour). Ties count against the query in both modes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from xclip.evaluation._images import encode_pil, open_image, require
from xclip.evaluation.common import RunContext
from xclip.models.zero_shot import prompt_classifier

NAME = "retrieval"
HELP = "image<->text and word-image<->string top-1/top-5 retrieval on synthetic quintuples (real vs nonsense words)"
CAPTION_LAYOUT = "DIR/metadata.jsonl with lines {\"file_name\": \"0.png\", \"text\": \"a caption\"}, images in DIR"
TASKS = {"im_t_txt_t": ("x_t", "y_t"), "im_it_img_t": ("x_it", "x_t"), "im_it_img_i": ("x_it", "x_i"),
         "im_it_txt_t": ("x_it", "y_t")}


@dataclass
class Settings:
    """Suite retrieval."""
    source: str = "synthetic-world"
    """x_i source: 'synthetic-world', an image folder ROOT/<class>/<img>, or hf:NAME"""
    split: Literal["train", "val", "test"] = "test"
    n: int = 500
    """number of quintuples"""
    canvas: int | None = None
    """canvas size in px (default: 224, or 64 for the synthetic world)"""
    real_fraction: float = 0.5
    """share of real (dictionary) words"""
    white_box: bool = False
    """draw words on a white sticker"""
    strict_duplicates: bool = False
    """repeated words are distinct gallery items (the released code's rule)"""
    captions: str | None = None
    """also image<->caption retrieval on a folder: DIR/metadata.jsonl with lines {"file_name": "0.png", "text":
    "a caption"}, images in DIR"""
    seed: int = 0
    """seed of the quintuples"""


def check(s: Settings, ctx: RunContext | None = None) -> None:
    if s.n < 1 or not 0.0 <= s.real_fraction <= 1.0:
        raise ValueError(f"--retrieval.n must be >= 1 and --retrieval.real_fraction in [0, 1] (got {s.n}, "
                         f"{s.real_fraction})")
    if s.source != "synthetic-world" and not s.source.startswith("hf:"):
        require(s.source, "--retrieval.source", "an image folder ROOT/<class>/<img>, 'synthetic-world' or hf:NAME",
                kind="folder")
    if s.captions:
        require(Path(s.captions) / "metadata.jsonl", "--retrieval.captions", CAPTION_LAYOUT)


def _keys(values: list, strict: bool) -> torch.Tensor:
    if strict:
        return torch.arange(len(values))
    ids: dict = {}
    return torch.tensor([ids.setdefault(v, len(ids)) for v in values])


def load_captions(folder: str | Path) -> tuple[list[Image.Image], list[str]]:
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"retrieval: no {meta}; expected {CAPTION_LAYOUT}")
    images, texts = [], []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            path, text = folder / row["file_name"], str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"retrieval: {meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}, got {line!r}") from e
        if not path.is_file():
            raise FileNotFoundError(f"retrieval: {meta}:{n}: image {path} missing")
        images.append(open_image(path, "retrieval").convert("RGB"))
        texts.append(text)
    if not images:
        raise ValueError(f"retrieval: {meta} lists no images")
    return images, texts


def _prefixed(prefix: str, d: dict[str, float], rename: dict[str, str]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        for old, new in rename.items():
            k = k.replace(old, new)
        out[f"{prefix}/{k}"] = v
    return out


def run(model, s: Settings = Settings(), ctx: RunContext | None = None) -> dict:
    from xclip.datamodules.quintuples import QuintupleDataset, StyleConfig, WordConfig, make_image_source
    from xclip.metrics.classification import LexiconAccuracy
    from xclip.metrics.retrieval import bidirectional_recall

    source = make_image_source(s.source, split=s.split)
    canvas = s.canvas or (64 if s.source == "synthetic-world" else 224)
    ds = QuintupleDataset(source, split=s.split, n=s.n, seed=s.seed, canvas_size=canvas,
                          words=WordConfig(real_fraction=s.real_fraction), style=StyleConfig(white_box=s.white_box))
    items = [ds[i] for i in range(len(ds))]
    feats = {k: encode_pil(model, (it[k] for it in items)) for k in ("x_i", "x_t", "x_it")}  # [N, D'] each
    feats["y_t"] = model.encode_texts([it["y_t"] for it in items]).cpu()  # raw strings (2.5)
    prompts = ds.class_prompts()
    class_feats = prompt_classifier(model, prompts).cpu()  # [C, D']
    class_ids = torch.tensor([it["class_id"] for it in items])
    res: dict = {"n": len(items), "n_real": sum(it["real"] for it in items), "canvas": canvas}
    for name, key in (("acc_im_i_txt_i", "x_i"), ("acc_im_it_txt_i", "x_it")):
        m = LexiconAccuracy()
        m.update(feats[key] @ class_feats.t(), class_ids)
        res[f"zero_shot/{name}"] = float(m.compute())
    y_i = class_feats[class_ids]  # [N, D'] each sample's class prompt embedding
    res.update(_prefixed("image_text", bidirectional_recall(feats["x_i"], y_i, class_ids),
                         {"a2b": "i2t", "b2a": "t2i"}))
    strict = s.strict_duplicates
    for subset, flag in (("real", 1), ("fake", 0)):
        sel = [i for i, it in enumerate(items) if it["real"] == flag]
        res[f"{subset}/n"] = len(sel)
        if not sel:
            continue
        words = [items[i]["y_t"] for i in sel]
        for task, (a, b) in TASKS.items():
            keys = _keys(sel, True) if task == "im_it_img_i" else _keys(words, strict)
            r = bidirectional_recall(feats[a][sel], feats[b][sel], keys)
            res.update(_prefixed(f"{subset}/{task}", r, {"a2b": "img2txt", "b2a": "txt2img"}))
    if s.captions:
        images, texts = load_captions(s.captions)
        r = bidirectional_recall(encode_pil(model, images), model.encode_texts(texts).cpu(), _keys(texts, False))
        res.update(_prefixed("captions", r, {"a2b": "i2t", "b2a": "t2i"}))
        res["captions/n"] = len(images)
    return res
