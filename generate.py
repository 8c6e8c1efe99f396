"""Per-sample generation entry point: one subcommand per method.

    python generate.py styleclip-optimize --description "a person with purple hair" --generator-checkpoint G.pt
    python generate.py styleclip-global --neutral "face" --target "smiling face" --generator-checkpoint G.pt
    python generate.py styleclip-mapper --ckpt mapper.ckpt --latents test_faces.pt --out results/mapper
    python generate.py <subcommand> --help

Each module in SUBCOMMAND_MODULES defines ``add_subcommand(subparsers)``, which adds its parser and sets
``func=run`` (``run(args)`` does the work). To add a method, write that hook and append the module here.
Every subcommand also accepts ``--config file.yaml``: a mapping of option names (dashes or underscores) to
values, used as defaults that explicit command-line flags override.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from xclip.utils.threads import configure_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUBCOMMAND_MODULES: list[str] = [
    "generation.styleclip_optimize",
    "generation.global_directions",
    "generation.styleclip_mapper",
    "generation.zerocap",
    "generation.vqgan_clip",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(subparsers)
    for sub in {id(s): s for s in subparsers.choices.values()}.values():  # an alias maps to the same parser
        sub.add_argument("--config", default=None, help="YAML file of option defaults (flags override it)")
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    import yaml

    with open(args.config) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise SystemExit(f"{args.config}: expected a mapping of option: value, got {type(cfg).__name__}")
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the chosen subcommand's parser
    known = {a.dest for a in sub._actions}
    defaults = {}
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise SystemExit(f"{args.config}: unknown option {key!r} for {args.command} "
                             f"(known: {sorted(k for k in known if k != 'help')})")
        if isinstance(value, list) and dest == "desired_words":
            value = " ".join(str(v) for v in value)
        defaults[dest] = value
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configure_threads()  # utils/threads.py: never more torch threads than free cores
    parser = build_parser()
    args = _apply_config(parser, list(sys.argv[1:] if argv is None else argv))
    return args.func(args)


if __name__ == "__main__":
    main()
