"""TextSpan analyses of an open_clip ViT (Gandelsman, Efros & Steinhardt, ICLR 2024); see docs/textspan.md.

    python analyze.py decompose --backbone ViT-B-16 --pretrained laion2b_s34b_b88k --data /data/imagenet/val \
        --out runs/prs_b16                                       # heads/mlps/cls_attn shards + classifier + meta
    python analyze.py ablate   --store runs/prs_b16 --keep-last 4 --out ablation.json
    python analyze.py textspan --store runs/prs_b16 --backbone ViT-B-16 --pretrained laion2b_s34b_b88k \
        --pool image_descriptions_general.txt --texts-per-head 20 --last-layers 4 --out runs/prs_b16/textspan
    python analyze.py segment  --backbone ViT-B-16 --pretrained laion2b_s34b_b88k --data /data/seg --out seg.json
    python analyze.py spurious --backbone ViT-B-16 --pretrained laion2b_s34b_b88k --waterbirds /data/waterbirds \
        --paper-heads ViT-B-16 --out-store runs/wb_b16 --out wb.json

Every subcommand also runs on the built-in world (``--backbone tiny-vit-world --pretrained synthetic-world
--data world:400``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("analyze")


def _backbone_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--backbone", required=required, help="open_clip ViT name (e.g. ViT-B-16, tiny-vit-world)")
    p.add_argument("--pretrained", default=None, help="open_clip tag, local weights file or shipped tag")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _build(args):
    from xclip.models.clip_backbone import build_clip

    return build_clip(args.backbone, args.pretrained, device=_device(args)).freeze()


def _templates(spec: str | None) -> list[str] | None:
    if not spec:
        return None
    ts = [t for t in spec.split("|") if t]
    if any("{}" not in t for t in ts):
        raise SystemExit(f"--templates {spec!r}: every '|'-separated template must contain '{{}}'")
    return ts


def _write(obj: dict, path: str | None) -> None:
    from xclip.utils.io import atomic_write_json

    if path:
        atomic_write_json(obj, path)
        log.info("wrote %s", path)
    text = json.dumps(obj, indent=1, default=str)
    print(text if len(text) < 4000 else text[:4000] + "\n... (truncated; see the JSON file)")


# ---- subcommands -----------------------------------------------------------------------------------------------
def cmd_decompose(args) -> dict:
    from xclip.analysis.datasets import load_classification
    from xclip.analysis.decomposition import decompose_to_store

    backbone = _build(args)
    data = load_classification(args.data, backbone, _templates(args.templates), args.limit_per_class)
    return decompose_to_store(backbone, data, args.out, batch_size=args.batch_size, shard_rows=args.shard_rows,
                              tokens=args.tokens, resume=not args.no_resume)


def cmd_ablate(args) -> dict:
    import torch

    from xclip.analysis.ablation import AblationSpec, ablated_embeddings, ablation_table, dataset_means, parse_heads, \
        zero_shot_accuracy
    from xclip.analysis.decomposition import load_store

    st = load_store(args.store)
    labels = torch.from_numpy(st["labels"][:])
    res = ablation_table(st["heads"], st["mlps"], st["classifier"], labels, cls_attn=st.get("cls_attn"),
                         keep_last=args.keep_last)
    if args.heads or args.layers:
        spec = AblationSpec(layers=args.layers or [], heads=parse_heads(args.heads or ""), mlps=args.mlps)
        means = dataset_means(st["heads"], st["mlps"])
        res["custom"] = {"spec": {"layers": spec.layers, "heads": spec.heads, "mlps": spec.mlps},
                         "accuracy": zero_shot_accuracy(ablated_embeddings(st["heads"], st["mlps"], spec, means),
                                                        st["classifier"], labels)}
    _write(res, args.out)
    return res


def cmd_textspan(args) -> dict:
    import torch

    from xclip.analysis.ablation import AblationSpec, ablated_embeddings, dataset_means, layers_before_last, \
        zero_shot_accuracy
    from xclip.analysis.decomposition import load_store
    from xclip.analysis.store import to_tensor
    from xclip.analysis.textspan import encode_text_pool, load_text_pool, run_textspan_heads, write_head_texts

    st = load_store(args.store)
    pool = load_text_pool(args.pool)
    backbone = _build(args)
    if backbone.spec() != st["meta"]["backbone"]:
        log.warning("backbone %s differs from the store's %s", backbone.spec(), st["meta"]["backbone"])
    texts = encode_text_pool(backbone, pool)
    L = st["meta"]["layers"]
    layers = list(range(L - args.last_layers, L))
    res = run_textspan_heads(st["heads"], texts, pool, layers, m=args.texts_per_head, rank=args.rank)
    out = Path(args.out)
    write_head_texts(res, out.with_suffix(".json"), out.with_suffix(".md"))
    summary = {"heads": len(res), "unique_texts": len({t for v in res.values() for t in v["texts"]}),
               "texts_per_head": args.texts_per_head, "rank": args.rank, "layers": layers}
    if not args.no_accuracy:
        # the anchor's driver: heads below the last layers mean-ablated, last-layer heads replaced by their
        # TEXTSPAN reconstructions; MLPs kept
        heads = to_tensor(st["heads"])                                           # [K, L, H, D] (in memory)
        labels = torch.from_numpy(st["labels"][:])
        means = dataset_means(heads, st["mlps"])
        base = ablated_embeddings(heads, st["mlps"], AblationSpec(), means)
        summary["baseline_accuracy"] = zero_shot_accuracy(base, st["classifier"], labels)
        for v in res.values():
            heads[:, v["layer"], v["head"]] = v["reconstruction"]
        spec = AblationSpec(layers=layers_before_last(L, args.last_layers))
        emb = ablated_embeddings(heads, st["mlps"], spec, means)
        summary["textspan_accuracy"] = zero_shot_accuracy(emb, st["classifier"], labels)
    from xclip.utils.io import atomic_write_json

    atomic_write_json(summary, out.with_suffix(".summary.json"))
    _write(summary, None)
    return {"summary": summary, "heads": res}


def cmd_segment(args) -> dict:
    import torch

    from xclip.analysis.datasets import build_classifier, load_segmentation, prompts_for
    from xclip.analysis.decomposition import decompose_images
    from xclip.analysis.segmentation import SegmentationMetrics, class_heatmaps

    backbone = _build(args)
    data = load_segmentation(args.data, backbone)
    if args.data.startswith("world"):
        from xclip.datamodules.synthetic_world import SHAPES, class_prompts

        prompts = [class_prompts(s) for s in SHAPES]
    else:
        if args.classes:
            names = [ln.strip() for ln in Path(args.classes).read_text().splitlines() if ln.strip()]
        else:
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

            names = list(IMAGENET_CLASSNAMES)
        prompts = prompts_for(names, _templates(args.templates))
    classifier = build_classifier(backbone, prompts).to(backbone.device)    # [D, C]
    metric = SegmentationMetrics()
    visual = backbone.model.visual
    n = min(len(data), args.limit) if args.limit else len(data)
    for a in range(0, n, args.batch_size):
        items = [data.load(i) for i in range(a, min(n, a + args.batch_size))]
        images = torch.stack([x for x, _ in items]).to(backbone.device)
        masks = torch.stack([m for _, m in items])
        dec = decompose_images(visual, images)
        cls = (dec.embedding @ classifier).argmax(1)                           # predicted class (paper protocol)
        maps = class_heatmaps(dec.tokens, classifier, cls, out_size=masks.shape[-1])
        metric.update(maps.cpu(), masks)
    res = {k: float(v) for k, v in metric.compute().items()}
    res["images"] = n
    _write(res, args.out)
    return res


def cmd_spurious(args) -> dict:
    import torch

    from xclip.analysis.ablation import parse_heads
    from xclip.analysis.decomposition import decompose_to_store, load_store
    from xclip.analysis.spurious import PAPER_HEADS, load_waterbirds, spurious_report

    if args.paper_heads:
        heads = PAPER_HEADS[args.paper_heads]
    elif args.heads:
        heads = parse_heads(args.heads)
    else:
        raise SystemExit("spurious: give --heads 'L:H ...' or --paper-heads {ViT-B-16,ViT-L-14,ViT-H-14}")
    backbone = _build(args)
    data = load_waterbirds(args.waterbirds, backbone, split=args.split, templates=_templates(args.templates),
                           limit=args.limit)
    decompose_to_store(backbone, data, args.out_store, batch_size=args.batch_size)
    st = load_store(args.out_store)
    res = spurious_report(st["heads"], st["mlps"], st["classifier"], torch.from_numpy(st["labels"][:]),
                          torch.from_numpy(st["groups"][:]), heads, group_names=data.group_names,
                          keep_last=None if args.keep_last < 0 else args.keep_last,
                          ablate_mlps=not args.keep_mlps, random_trials=args.random_trials)
    _write(res, args.out)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("decompose", help="decompose a labelled image set into a chunked on-disk store")
    _backbone_args(d)
    d.add_argument("--data", required=True, help="'world[:N[:SEED]]' or ROOT/<class>/<image> folder")
    d.add_argument("--out", required=True, help="store folder")
    d.add_argument("--templates", default=None, help="'|'-separated prompts with {} (default: 80 OpenAI templates)")
    d.add_argument("--limit-per-class", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--shard-rows", type=int, default=1024, help="images per on-disk shard")
    d.add_argument("--tokens", action="store_true", help="also store per-token [L, N, D] terms (large)")
    d.add_argument("--no-resume", action="store_true", help="overwrite instead of resuming")
    d.set_defaults(func=cmd_decompose)

    a = sub.add_parser("ablate", help="mean-ablation accuracies from a store (spec A4)")
    a.add_argument("--store", required=True)
    a.add_argument("--keep-last", type=int, nargs="*", default=[4], help="report 'all layers but the last k'")
    a.add_argument("--heads", default=None, help="custom ablation: 'L:H L:H ...'")
    a.add_argument("--layers", type=int, nargs="*", default=None, help="custom ablation: whole layers")
    a.add_argument("--mlps", action="store_true", help="custom ablation: also the MLP/embedding terms")
    a.add_argument("--out", default=None, help="JSON results")
    a.set_defaults(func=cmd_ablate)

    t = sub.add_parser("textspan", help="TEXTSPAN text bases per head (spec A5)")
    t.add_argument("--store", required=True)
    _backbone_args(t)
    t.add_argument("--pool", required=True, help="text pool file, one description a line")
    t.add_argument("--texts-per-head", type=int, default=20, help="m (README: 20; script default 10)")
    t.add_argument("--last-layers", type=int, default=4, help="heads of the last k layers (README: 4)")
    t.add_argument("--rank", type=int, default=80, help="--w_ov_rank: texts projected onto the head's top-r span")
    t.add_argument("--no-accuracy", action="store_true", help="skip the replaced-heads accuracy check")
    t.add_argument("--out", required=True, help="output stem: STEM.json, STEM.md, STEM.summary.json")
    t.set_defaults(func=cmd_textspan)

    s = sub.add_parser("segment", help="zero-shot segmentation from per-token contributions (spec A6.2)")
    _backbone_args(s)
    s.add_argument("--data", required=True, help="'world[:N[:SEED]]' or ROOT/images + ROOT/masks")
    s.add_argument("--classes", default=None, help="class-name file for folders (default: ImageNet's 1000)")
    s.add_argument("--templates", default=None)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--out", default=None)
    s.set_defaults(func=cmd_segment)

    w = sub.add_parser("spurious", help="worst-group accuracy with named heads mean-ablated (spec A6.1)")
    _backbone_args(w)
    w.add_argument("--waterbirds", required=True, help="folder with metadata.csv and the images")
    w.add_argument("--split", default="test", choices=("train", "val", "test"))
    w.add_argument("--heads", default=None, help="'L:H L:H ...' (0-indexed)")
    w.add_argument("--paper-heads", default=None, choices=("ViT-B-16", "ViT-L-14", "ViT-H-14"))
    w.add_argument("--keep-last", type=int, default=4, help="also ablate attention layers before the last k "
                                                            "(anchor parity; -1 disables)")
    w.add_argument("--keep-mlps", action="store_true", help="do not mean-ablate the MLP/embedding terms")
    w.add_argument("--random-trials", type=int, default=5)
    w.add_argument("--templates", default=None)
    w.add_argument("--limit", type=int, default=None)
    w.add_argument("--batch-size", type=int, default=32)
    w.add_argument("--out-store", required=True, help="store folder for the decomposition (resumable)")
    w.add_argument("--out", default=None)
    w.set_defaults(func=cmd_spurious)
    return p


def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
