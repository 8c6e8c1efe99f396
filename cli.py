"""The `xclip` console script: one command, seven subcommands.

    xclip train fit --config configs/spelling/forget_to_spell_world.yaml
    xclip evaluate --config ... | xclip generate <method> ... | xclip analyze <analysis> ...
    xclip explain --image a.png --text "a red star" --out outputs/explain
    xclip demo --out outputs/demo
    xclip reproduce --parts spelling coop spatial textspan zerocap --out results/reproduce
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {  # subcommand -> (module whose main(argv) runs it, one-line help)
    "train": ("xclip.train", "LightningCLI: fit / validate / test / predict a config"),
    "evaluate": ("xclip.evaluate", "evaluate a checkpoint or pretrained CLIP on named suites"),
    "generate": ("xclip.generate", "per-sample generation: styleclip-*, vqgan-clip, zerocap"),
    "analyze": ("xclip.analyze", "TextSpan decomposition, ablation, textspan, segmentation"),
    "explain": ("xclip.explain_cli", "relevance maps for images x texts as a PNG grid (+ HTML)"),
    "demo": ("xclip.demo", "forget-to-spell on the built-in world"),
    "reproduce": ("xclip.reproduction.cli", "each paper's headline effect on the built-in world (docs/reproduction.md)"),
}
USAGE = "usage: xclip {" + ",".join(SUBCOMMANDS) + "} [--help] ..."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("\n".join(f"  {name:9s} {help_}" for name, (_, help_) in SUBCOMMANDS.items()))
        return 0
    if argv[0] in ("-V", "--version"):
        from xclip import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"xclip: unknown subcommand {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    result = importlib.import_module(SUBCOMMANDS[name][0]).main(rest)  # fixed table: no name from user input imported
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
