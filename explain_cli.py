"""`xclip explain`: relevance maps for images x texts as one labelled PNG grid (+ a self-contained HTML page).

    xclip explain --image a.png b.png --text "a red star" "a blue circle" --out outputs/explain
    xclip explain --config configs/explain/world_example.yaml [--print_config]
    xclip explain --image photo.jpg --text "a dog" --backbone ViT-B-32 --pretrained openai --out out/

Writes OUT/explain.png (rows images, columns texts: image relevance overlay, the text's token heat strip, cosine
similarity and softmax-over-texts probability), OUT/explain.html with --html true (the default), and logs both to
W&B with --wandb true (project --wandb_project; offline unless a W&B key is configured).  Inputs and the output folder are checked before
any model is built.

Relative image paths: one written in a ``--config`` file is relative to that file's folder (jsonargparse's rule for
path types), one given on the command line to the current folder; so ``xclip explain --config <packaged config>``
runs from any folder.  ``--print_config`` writes the paths as they were written: re-use a printed config from the
original config's folder, or write absolute paths.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import Path_fr

DEFAULT_BACKBONE = "tiny-vit-world"
DEFAULT_PRETRAINED = "synthetic-world"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="xclip explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="YAML config (repeatable); flags override it")
    # Path_fr: an existing file, relative to its config file's folder when written in one; anything else stays a
    # string, reported with every other unreadable image by models.explain.load_images (one error, all bad paths)
    p.add_argument("--image", type=Union[Path_fr, str], nargs="+", required=True,
                   help="image file(s); relative to the config file's folder when given in a --config")
    p.add_argument("--text", type=str, nargs="+", required=True, help="text(s) to explain each image against")
    p.add_argument("--out", type=str, required=True, help="output folder (created)")
    p.add_argument("--backbone", type=str, default=DEFAULT_BACKBONE, help="open_clip model name")
    p.add_argument("--pretrained", type=Optional[str], default=DEFAULT_PRETRAINED,
                   help="pretrained tag / weights file (default: the shipped world CLIP)")
    p.add_argument("--start_layer_text", type=int, default=0, help="first text layer in R (0 = all, -1 = last)")
    p.add_argument("--start_layer_image", type=int, default=-1, help="first image layer in R (-1 = last, 0 = all)")
    p.add_argument("--html", type=bool, default=True, help="also write a self-contained explain.html")
    p.add_argument("--wandb", type=bool, default=False, help="log the grid and a per-pair table to W&B "
                   "(offline without a key)")
    p.add_argument("--wandb_project", type=str, default="xclip-explain")
    p.add_argument("--device", type=str, default="cpu")
    return p


def image_paths(cfg) -> list[str]:
    """``--image`` as absolute paths where found at parse time (module doc), else as given (``~`` expanded)."""
    return [os.fspath(p) if isinstance(p, Path_fr) else str(Path(p).expanduser()) for p in cfg.image]


def run(cfg) -> dict:
    """Checks, then the work. Returns {"png": path, "html": path | None, "wandb": dir | None, "result": ExplainResult}."""
    from xclip.models.explain import load_images
    from xclip.utils.io import check_writable_dir

    images = load_images(image_paths(cfg))  # every image readable, else one error naming all bad paths
    texts = [t for t in cfg.text if t.strip()]
    if len(texts) != len(cfg.text):
        raise ValueError("--text entries must be non-empty.")
    out = Path(cfg.out).expanduser()
    check_writable_dir(out, "--out")  # utils/io.py: created, and a file can be made in it, before any work
    if cfg.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb needs the wandb package (pip install wandb).")

    from xclip.models.clip_backbone import build_clip
    from xclip.models.explain import explain, log_wandb, write_grid_png, write_html

    backbone = build_clip(cfg.backbone, cfg.pretrained, device=cfg.device).freeze()
    labels = [Path(p).name for p in image_paths(cfg)]
    result = explain(backbone, images, texts, start_layer_text=cfg.start_layer_text,
                     start_layer_image=cfg.start_layer_image, labels=labels)
    png = write_grid_png(result, out / "explain.png")
    page = write_html(result, out / "explain.html") if cfg.html else None
    run_dir = log_wandb(result, png, cfg.wandb_project, out) if cfg.wandb else None
    return {"png": png, "html": page, "wandb": run_dir, "result": result}


def main(argv: list[str] | None = None) -> int:
    from xclip.utils.threads import configure_threads

    configure_threads()  # utils/threads.py: never more torch threads than free cores
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        done = run(cfg)
    except ValueError as e:
        print(f"xclip explain: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {done['png']}" + (f" and {done['html']}" if done["html"] else "")
          + (f"; W&B run in {done['wandb']}" if done["wandb"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
