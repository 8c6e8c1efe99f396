"""TextSpan analyses of an open_clip ViT (Gandelsman, Efros & Steinhardt, ICLR 2024); see docs/textspan.md.

    xclip analyze decompose --config configs/analyze/decompose_imagenet_b16.yaml   # store: heads/mlps/cls_attn shards
    xclip analyze ablate    --store runs/prs_b16 --keep_last '[1, 2, 4]' --out ablation.json
    xclip analyze textspan  --config configs/analyze/textspan_imagenet_b16.yaml
    xclip analyze segment   --backbone ViT-B-16 --pretrained laion2b_s34b_b88k --data /data/seg --out seg.json
    xclip analyze spurious  --config configs/analyze/spurious_waterbirds_b16.yaml

Every subcommand takes ``--config a.yaml`` (repeatable; the file holds that subcommand's settings), ``--print_config``
and snake_case flags; the settings are the typed signatures of the functions below (callable from Python too).
Every subcommand also runs on the built-in world (``--backbone tiny-vit-world --pretrained synthetic-world
--data world:400``). Inputs, outputs and head lists are checked before any decomposition starts.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("analyze")
PaperHeads = Literal["ViT-B-16", "ViT-L-14", "ViT-H-14"]   # analysis.spurious.PAPER_HEADS


def _build(backbone: str, pretrained: str | None, device: str | None):
    import torch

    from xclip.models.clip_backbone import build_clip

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return build_clip(backbone, pretrained, device=device).freeze()


def _check_templates(templates: list[str] | None) -> None:
    if templates is not None:
        from xclip.evaluation._images import check_templates

        check_templates(templates, "--templates")


def _check_source(data: str, flag: str, layout: str, need: tuple[str, ...] = ()) -> None:
    """'world[:N[:SEED]]' or an existing folder (with the sub-folders ``need``)."""
    if data.startswith("world"):
        return
    root = Path(data).expanduser()
    if not root.is_dir() or any(not (root / n).is_dir() for n in need):
        raise FileNotFoundError(f"{flag} {data}: no such folder; expected 'world[:N[:SEED]]' or {layout}")


def _check_out(out: str | None, flag: str = "--out") -> None:
    from xclip.utils.io import check_writable_file

    if out:
        check_writable_file(out, flag)


def _store_meta(store: str) -> dict:
    meta = Path(store).expanduser() / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"--store {store} is not a decomposition store (no meta.json); run "
                                f"`xclip analyze decompose --out {store} ...` first")
    return json.loads(meta.read_text())


def check_heads(heads: list[tuple[int, int]], layers: int, n_heads: int, what: str, fix: str) -> None:
    """Every (layer, head) exists in a model with ``layers`` x ``n_heads``; else ValueError naming both."""
    bad = [f"{lay}:{h}" for lay, h in heads if not (0 <= lay < layers and 0 <= h < n_heads)]
    if bad:
        raise ValueError(f"{what} names {', '.join(bad)}, but the model has {layers} layers x {n_heads} heads "
                         f"(0-indexed); {fix}")


def _write(obj: dict, path: str | None) -> None:
    from xclip.utils.io import atomic_write_json

    if path:
        atomic_write_json(obj, path)
        log.info("wrote %s", path)
    text = json.dumps(obj, indent=1, default=str)
    print(text if len(text) < 4000 else text[:4000] + "\n... (truncated; see the JSON file)")


# ---- subcommands -----------------------------------------------------------------------------------------------
def decompose(backbone: str, data: str, out: str, pretrained: str | None = None, device: str | None = None,
              templates: list[str] | None = None, limit_per_class: int | None = None, batch_size: int = 32,
              shard_rows: int = 1024, tokens: bool = False, resume: bool = True) -> dict:
    """Decompose a labelled image set into a chunked on-disk store (spec A3).

    Args:
        backbone: open_clip ViT name (e.g. ViT-B-16, tiny-vit-world)
        data: 'world[:N[:SEED]]' or a ROOT/<class>/<image> folder
        out: store folder (heads/mlps/cls_attn shards, classifier.pt, meta.json)
        pretrained: open_clip tag, local weights file or shipped tag
        device: cpu / cuda (default: cuda when available)
        templates: prompts with {} (default: the world ensemble / the 80 OpenAI templates)
        limit_per_class: at most this many images per class
        batch_size: images per forward
        shard_rows: images per on-disk shard
        tokens: also store per-token [L, N, D] terms (large)
        resume: continue an interrupted store (false: overwrite)
    """
    from xclip.analysis.datasets import CLASS_FOLDER_LAYOUT, load_classification
    from xclip.analysis.decomposition import decompose_to_store
    from xclip.utils.io import check_writable_dir

    _check_templates(templates)
    _check_source(data, "--data", CLASS_FOLDER_LAYOUT)
    check_writable_dir(out, "--out")
    bb = _build(backbone, pretrained, device)
    ds = load_classification(data, bb, templates, limit_per_class)
    return decompose_to_store(bb, ds, out, batch_size=batch_size, shard_rows=shard_rows, tokens=tokens,
                              resume=resume)


def ablate(store: str, keep_last: list[int] | None = None, heads: str | None = None,
           layers: list[int] | None = None, mlps: bool = False, out: str | None = None) -> dict:
    """Mean-ablation accuracies from a store (spec A4).

    Args:
        store: a folder written by `decompose`
        keep_last: report 'all layers but the last k' for each k (default [4])
        heads: custom ablation: heads 'LAYER:HEAD ...' (0-indexed; quote it in YAML)
        layers: custom ablation: whole layers
        mlps: custom ablation: also the MLP/embedding terms
        out: JSON results file
    """
    import torch

    from xclip.analysis.ablation import (
        AblationSpec,
        ablated_embeddings,
        ablation_table,
        dataset_means,
        parse_heads,
        zero_shot_accuracy,
    )
    from xclip.analysis.decomposition import load_store

    meta = _store_meta(store)
    keep_last = [4] if keep_last is None else keep_last
    spec = AblationSpec(layers=layers or [], heads=parse_heads(heads or ""), mlps=mlps)
    check_heads(spec.heads, meta["layers"], meta["heads"], f"--heads {heads!r}", "give heads within range")
    bad = [v for v in [*spec.layers, *keep_last] if not 0 <= v <= meta["layers"]]
    if bad:
        raise ValueError(f"--layers / --keep_last {bad}: the store has {meta['layers']} layers")
    _check_out(out)
    st = load_store(store)
    labels = torch.from_numpy(st["labels"][:])
    res = ablation_table(st["heads"], st["mlps"], st["classifier"], labels, cls_attn=st.get("cls_attn"),
                         keep_last=keep_last)
    if heads or layers:
        means = dataset_means(st["heads"], st["mlps"])
        res["custom"] = {"spec": {"layers": spec.layers, "heads": spec.heads, "mlps": spec.mlps},
                         "accuracy": zero_shot_accuracy(ablated_embeddings(st["heads"], st["mlps"], spec, means),
                                                        st["classifier"], labels)}
    _write(res, out)
    return res


def textspan(store: str, backbone: str, pool: str, out: str, pretrained: str | None = None,
             device: str | None = None, texts_per_head: int = 20, last_layers: int = 4, rank: int = 80,
             accuracy: bool = True) -> dict:
    """TEXTSPAN text bases per head (spec A5).

    Args:
        store: a folder written by `decompose`
        backbone: open_clip ViT name (the store's)
        pool: text pool file, one description a line
        out: output stem: STEM.json, STEM.md, STEM.summary.json
        pretrained: open_clip tag, local weights file or shipped tag
        device: cpu / cuda (default: cuda when available)
        texts_per_head: m (README: 20; the script's default 10)
        last_layers: heads of the last k layers (README: 4)
        rank: the anchor's --w_ov_rank: texts projected onto the head's top-r span
        accuracy: also the replaced-heads accuracy check
    """
    import torch

    from xclip.analysis.ablation import (
        AblationSpec,
        ablated_embeddings,
        dataset_means,
        layers_before_last,
        zero_shot_accuracy,
    )
    from xclip.analysis.decomposition import load_store
    from xclip.analysis.store import to_tensor
    from xclip.analysis.textspan import encode_text_pool, load_text_pool, run_textspan_heads, write_head_texts
    from xclip.utils.io import atomic_write_json

    meta = _store_meta(store)
    L = meta["layers"]
    if not 1 <= last_layers <= L:
        raise ValueError(f"--last_layers {last_layers}: the store has {L} layers")
    texts_pool = load_text_pool(pool)
    stem = Path(out)
    _check_out(str(stem.with_suffix(".summary.json")), "--out")
    st = load_store(store)
    bb = _build(backbone, pretrained, device)
    if bb.spec() != meta["backbone"]:
        log.warning("backbone %s differs from the store's %s", bb.spec(), meta["backbone"])
    texts = encode_text_pool(bb, texts_pool)
    layers = list(range(L - last_layers, L))
    res = run_textspan_heads(st["heads"], texts, texts_pool, layers, m=texts_per_head, rank=rank)
    write_head_texts(res, stem.with_suffix(".json"), stem.with_suffix(".md"))
    summary = {"heads": len(res), "unique_texts": len({t for v in res.values() for t in v["texts"]}),
               "texts_per_head": texts_per_head, "rank": rank, "layers": layers}
    if accuracy:
        # the anchor's driver: heads below the last layers mean-ablated, last-layer heads replaced by their
        # TEXTSPAN reconstructions; MLPs kept
        heads = to_tensor(st["heads"])                                           # [K, L, H, D] (in memory)
        labels = torch.from_numpy(st["labels"][:])
        means = dataset_means(heads, st["mlps"])
        base = ablated_embeddings(heads, st["mlps"], AblationSpec(), means)
        summary["baseline_accuracy"] = zero_shot_accuracy(base, st["classifier"], labels)
        for v in res.values():
            heads[:, v["layer"], v["head"]] = v["reconstruction"]
        spec = AblationSpec(layers=layers_before_last(L, last_layers))
        emb = ablated_embeddings(heads, st["mlps"], spec, means)
        summary["textspan_accuracy"] = zero_shot_accuracy(emb, st["classifier"], labels)
    atomic_write_json(summary, stem.with_suffix(".summary.json"))
    _write(summary, None)
    return {"summary": summary, "heads": res}


def segment(backbone: str, data: str, pretrained: str | None = None, device: str | None = None,
            classes: str | None = None, templates: list[str] | None = None, limit: int | None = None,
            batch_size: int = 8, out: str | None = None) -> dict:
    """Zero-shot segmentation from per-token contributions (spec A6.2).

    Args:
        backbone: open_clip ViT name
        data: 'world[:N[:SEED]]' or a folder ROOT/images + ROOT/masks
        pretrained: open_clip tag, local weights file or shipped tag
        device: cpu / cuda (default: cuda when available)
        classes: class-name file for folders, one a line (default: ImageNet's 1000)
        templates: prompts with {} (default: the 80 OpenAI templates)
        limit: at most this many images
        batch_size: images per forward
        out: JSON results file
    """
    import torch

    from xclip.analysis.datasets import SEG_FOLDER_LAYOUT, build_classifier, load_segmentation, prompts_for
    from xclip.analysis.decomposition import decompose_images
    from xclip.analysis.segmentation import SegmentationMetrics, class_heatmaps

    _check_templates(templates)
    _check_source(data, "--data", SEG_FOLDER_LAYOUT, need=("images", "masks"))
    if classes and not Path(classes).is_file():
        raise FileNotFoundError(f"--classes {classes}: no such file (one class name a line)")
    _check_out(out)
    bb = _build(backbone, pretrained, device)
    ds = load_segmentation(data, bb)
    if data.startswith("world"):
        from xclip.datamodules.synthetic_world import SHAPES, class_prompts

        prompts = [class_prompts(s) for s in SHAPES]
    else:
        if classes:
            names = [ln.strip() for ln in Path(classes).read_text().splitlines() if ln.strip()]
        else:
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

            names = list(IMAGENET_CLASSNAMES)
        prompts = prompts_for(names, templates)
    classifier = build_classifier(bb, prompts).to(bb.device)    # [D, C]
    metric = SegmentationMetrics()
    visual = bb.model.visual
    n = min(len(ds), limit) if limit else len(ds)
    for a in range(0, n, batch_size):
        items = [ds.load(i) for i in range(a, min(n, a + batch_size))]
        images = torch.stack([x for x, _ in items]).to(bb.device)
        masks = torch.stack([m for _, m in items])
        dec = decompose_images(visual, images)
        cls = (dec.embedding @ classifier).argmax(1)                           # predicted class (paper protocol)
        maps = class_heatmaps(dec.tokens, classifier, cls, out_size=masks.shape[-1])
        metric.update(maps.cpu(), masks)
    res = {k: float(v) for k, v in metric.compute().items()}
    res["images"] = n
    _write(res, out)
    return res


def spurious(backbone: str, waterbirds: str, out_store: str, pretrained: str | None = None,
             device: str | None = None, split: Literal["train", "val", "test"] = "test", heads: str | None = None,
             paper_heads: PaperHeads | None = None, keep_last: int | None = 4, ablate_mlps: bool = True,
             random_trials: int = 5, templates: list[str] | None = None, limit: int | None = None,
             batch_size: int = 32, out: str | None = None) -> dict:
    """Worst-group accuracy with named heads mean-ablated (spec A6.1).

    Args:
        backbone: open_clip ViT name
        waterbirds: folder with metadata.csv and the images
        out_store: store folder for the decomposition (resumable)
        pretrained: open_clip tag, local weights file or shipped tag
        device: cpu / cuda (default: cuda when available)
        split: Waterbirds split
        heads: heads 'LAYER:HEAD ...' (0-indexed; quote it in YAML)
        paper_heads: the paper's head list of that model instead of heads
        keep_last: also ablate attention layers before the last k (anchor parity; null: not)
        ablate_mlps: also mean-ablate the MLP/embedding terms (anchor parity)
        random_trials: random head sets of the same size, for comparison
        templates: prompts with {} (default: the 80 OpenAI templates)
        limit: at most this many images
        batch_size: images per forward
        out: JSON results file
    """
    import torch

    from xclip.analysis.ablation import parse_heads
    from xclip.analysis.decomposition import decompose_to_store, load_store, num_layers_heads
    from xclip.analysis.spurious import PAPER_HEADS, load_waterbirds, spurious_report
    from xclip.utils.io import check_writable_dir

    if paper_heads and heads:
        raise ValueError("give --heads or --paper_heads, not both")
    if not (paper_heads or heads):
        raise ValueError(f"give --heads 'L:H ...' or --paper_heads {{{','.join(PAPER_HEADS)}}}")
    head_list = PAPER_HEADS[paper_heads] if paper_heads else parse_heads(heads)
    _check_templates(templates)
    if not (Path(waterbirds) / "metadata.csv").is_file():
        raise FileNotFoundError(f"--waterbirds {waterbirds}: no metadata.csv (expected ROOT/metadata.csv with "
                                f"columns img_filename,y,split,place and the images under ROOT)")
    check_writable_dir(out_store, "--out_store")
    _check_out(out)
    bb = _build(backbone, pretrained, device)
    L, H = num_layers_heads(bb.model.visual)
    what = f"--paper_heads {paper_heads}" if paper_heads else f"--heads {heads!r}"
    fix = (f"use --backbone {paper_heads}, or --heads 'L:H ...' within range" if paper_heads
           else "give heads within range")
    check_heads(head_list, L, H, what, fix)
    if keep_last is not None and not 0 <= keep_last <= L:
        raise ValueError(f"--keep_last {keep_last}: the model has {L} layers")
    data = load_waterbirds(waterbirds, bb, split=split, templates=templates, limit=limit)
    decompose_to_store(bb, data, out_store, batch_size=batch_size)
    st = load_store(out_store)
    res = spurious_report(st["heads"], st["mlps"], st["classifier"], torch.from_numpy(st["labels"][:]),
                          torch.from_numpy(st["groups"][:]), head_list, group_names=data.group_names,
                          keep_last=keep_last, ablate_mlps=ablate_mlps, random_trials=random_trials)
    _write(res, out)
    return res


COMMANDS: dict[str, Callable[..., dict]] = {"decompose": decompose, "ablate": ablate, "textspan": textspan,
                                            "segment": segment, "spurious": spurious}


def build_parser() -> ArgumentParser:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = ArgumentParser(prog="xclip analyze", description="TextSpan analyses of an open_clip ViT (docs/textspan.md).")
    sub = p.add_subcommands(required=True, dest="subcommand")
    for name, fn in COMMANDS.items():
        sp = ArgumentParser(prog=f"xclip analyze {name}", description=fn.__doc__.split("\n")[0])
        sp.add_argument("--config", action=ActionConfigFile, help=f"YAML config (repeatable): configs/analyze/"
                                                                  f"{name}_*.yaml")
        sp.add_function_arguments(fn, as_group=False)
        sub.add_subcommand(name, sp, help=fn.__doc__.split("\n")[0])
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    from xclip.utils.io import check_config_files

    argv = list(sys.argv[1:] if argv is None else argv)
    check_config_files(argv)  # a bad --config file is named before jsonargparse reads it
    cfg = build_parser().parse_args(argv)
    name = cfg.subcommand
    kwargs = cfg[name].as_dict()
    kwargs.pop("config", None)
    try:
        return COMMANDS[name](**kwargs)
    except (ValueError, FileNotFoundError) as e:   # bad input found before (or instead of) the long work
        raise SystemExit(f"analyze {name}: {e}") from e


if __name__ == "__main__":
    main()
