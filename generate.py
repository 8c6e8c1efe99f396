"""Per-sample generation: `xclip generate <method>` (jsonargparse, the grammar of `xclip train`).

    xclip generate vqgan-clip --config configs/vqgan/tiny_spatial.yaml --steps 20
    xclip generate styleclip-optimize --config configs/styleclip/optimize_purple_hair.yaml --generator.size 256
    xclip generate styleclip-global --config configs/styleclip/global_smile.yaml --alpha 2 4
    xclip generate styleclip-mapper --config configs/styleclip/apply_mapper_purple_hair.yaml --ckpt best.ckpt
    xclip generate zerocap --config configs/zerocap/caption.yaml --images photos/
    xclip generate <method> --help | --print_config

Every subcommand takes ``--config a.yaml`` (repeatable; later files and flags override earlier ones),
``--print_config`` (the resolved settings as YAML, re-readable with ``--config``), dotted overrides of nested
groups (``--generator.size 256``); a list given on the command line replaces the config's list. The settings of
each method are its generation dataclass (``VQGANCLIPConfig``, ``OptimizeConfig``, ``GlobalDirectionConfig``,
``ZeroCapConfig``, ``GeneratorConfig``). To add a method: a module with ``add_arguments(parser)`` and
``run(cfg)``, and a row in SUBCOMMANDS.
"""
from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace  # noqa: E402

from xclip.generation import global_directions, styleclip_mapper, styleclip_optimize, vqgan_clip, zerocap  # noqa: E402

# subcommand -> (module with add_arguments(parser) and run(cfg), one-line help). A fixed table: no module is
# imported by a name read from the command line or a file.
SUBCOMMANDS: dict[str, tuple[ModuleType, str]] = {
    "styleclip-optimize": (styleclip_optimize, "StyleCLIP latent optimisation (+ NTLB word-relevance loss)"),
    "styleclip-mapper": (styleclip_mapper, "apply a trained StyleCLIP latent mapper to W+ latents"),
    "styleclip-global": (global_directions, "StyleCLIP global directions (StyleSpace)"),
    "vqgan-clip": (vqgan_clip, "VQGAN-CLIP generation with NTLB spatial (bbox) conditioning"),
    "zerocap": (zerocap, "ZeroCap: CLIP-guided zero-shot captioning / visual arithmetic"),
}


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help with the module docstrings' line breaks kept (their usage examples)."""


def subcommand_parser(name: str) -> ArgumentParser:
    module, help_ = SUBCOMMANDS[name]
    p = ArgumentParser(prog=f"xclip generate {name}", description=(module.__doc__ or help_),
                       formatter_class=HelpFormatter)
    p.add_argument("--config", action=ActionConfigFile, help="YAML settings (repeatable; flags after it override)")
    module.add_arguments(p)
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="xclip generate", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subcommands(dest="command", required=True)
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_subcommand(name, subcommand_parser(name), help=help_)
    return parser


def parse(argv: list[str] | None = None) -> tuple[str, Namespace]:
    from xclip.utils.io import check_config_files

    argv = list(sys.argv[1:] if argv is None else argv)
    check_config_files(argv)  # a bad --config file is named before jsonargparse reads it
    cfg = build_parser().parse_args(argv)
    return cfg.command, cfg[cfg.command]


def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    name, cfg = parse(argv)
    return SUBCOMMANDS[name][0].run(cfg)


if __name__ == "__main__":
    main()
