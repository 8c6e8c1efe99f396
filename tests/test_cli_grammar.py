"""`xclip evaluate` and `xclip analyze`: every YAML under configs/evaluate and configs/analyze parses against the
schemas (suite Settings / subcommand signatures), and `--print_config` round-trips to the same namespace."""
from pathlib import Path
from typing import get_args

import pytest
import yaml

from xclip import analyze, evaluate

ROOT = Path(__file__).resolve().parent.parent
EVAL_CONFIGS = sorted((ROOT / "configs" / "evaluate").glob("*.yaml"))
ANALYZE_CONFIGS = sorted((ROOT / "configs" / "analyze").glob("*.yaml"))


def _strip(ns) -> dict:
    d = ns.as_dict()
    d.pop("config", None)
    for v in d.values():
        if isinstance(v, dict):
            v.pop("config", None)
    return d


def test_there_are_configs():
    assert len(EVAL_CONFIGS) >= 4 and len(ANALYZE_CONFIGS) >= 5
    assert {p.name.split("_")[0] for p in ANALYZE_CONFIGS} <= set(analyze.COMMANDS)


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=[p.name for p in EVAL_CONFIGS])
def test_evaluate_config_parses_and_instantiates(path):
    parser = evaluate.build_parser()
    cfg = parser.parse_args(["--config", str(path)])
    assert cfg.suite and set(cfg.suite) <= set(evaluate.SUITE_TABLE)
    raw = yaml.safe_load(path.read_text())
    init = parser.instantiate(cfg)
    for name in cfg.suite:                      # each suite's section became its Settings dataclass
        s = init[name]
        assert isinstance(s, evaluate.SUITE_TABLE[name].Settings)
        for key, value in (raw.get(name) or {}).items():
            assert getattr(s, key) == value, (name, key)


@pytest.mark.parametrize("path", ANALYZE_CONFIGS, ids=[p.name for p in ANALYZE_CONFIGS])
def test_analyze_config_parses(path):
    sub = path.name.split("_")[0]
    cfg = analyze.build_parser().parse_args([sub, "--config", str(path)])
    assert cfg.subcommand == sub
    for key, value in yaml.safe_load(path.read_text()).items():
        assert cfg[sub][key] == value, key


def _printed(main, argv, capsys, tmp_path) -> Path:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--print_config"])
    assert e.value.code == 0
    out = tmp_path / "printed.yaml"
    out.write_text(capsys.readouterr().out)
    return out


@pytest.mark.parametrize("argv", [
    ["--config", str(ROOT / "configs/evaluate/world.yaml"), "--world.n", "50", "--suite", "world", "retrieval",
     "--retrieval.white_box", "true", "--typographic.templates", '["a {}.", "an {}."]',
     "--mean_ablation.heads", "11:6 10:2", "--detection_ap.label_map", '{"motorcycle": "motorbike"}'],
    ["--config", str(ROOT / "configs/evaluate/spatial_generation_world.yaml"), "--spatial_generation.methods",
     "[plain, explainability]", "--wandb", "true"],
], ids=["world", "spatial"])
def test_evaluate_print_config_round_trips(argv, capsys, tmp_path):
    parser = evaluate.build_parser()
    want = parser.parse_args(evaluate.merge_repeated(argv))
    printed = _printed(evaluate.main, argv, capsys, tmp_path)
    got = parser.parse_args(["--config", str(printed)])
    assert _strip(got) == _strip(want)
    assert want.world.n == 50 or "spatial" in str(argv)


@pytest.mark.parametrize("sub,argv", [
    ("decompose", ["--config", str(ROOT / "configs/analyze/decompose_world.yaml"), "--tokens", "true"]),
    ("ablate", ["--config", str(ROOT / "configs/analyze/ablate_imagenet_b16.yaml"), "--heads", "11:6 11:0"]),
    ("textspan", ["--config", str(ROOT / "configs/analyze/textspan_imagenet_b16.yaml"), "--rank", "40"]),
    ("segment", ["--config", str(ROOT / "configs/analyze/segment_world.yaml"), "--templates", '["a {}."]']),
    ("spurious", ["--config", str(ROOT / "configs/analyze/spurious_waterbirds_b16.yaml"), "--keep_last", "null"]),
])
def test_analyze_print_config_round_trips(sub, argv, capsys, tmp_path):
    parser = analyze.build_parser()
    want = parser.parse_args([sub, *argv])
    printed = _printed(analyze.main, [sub, *argv], capsys, tmp_path)
    got = parser.parse_args([sub, "--config", str(printed)])
    assert _strip(got[sub]) == _strip(want[sub])


def test_repeated_suite_flag_adds_to_the_list():
    assert evaluate.merge_repeated(["--suite", "world", "--out", "x.json", "--suite", "retrieval", "typographic"]) \
        == ["--out", "x.json", "--suite", "world", "retrieval", "typographic"]
    cfg = evaluate.build_parser().parse_args(evaluate.merge_repeated(["--suite", "world", "--suite=retrieval"]))
    assert cfg.suite == ["world", "retrieval"]


def test_spatial_methods_literal_matches_the_generator():
    from xclip.evaluation.spatial_generation import Method
    from xclip.generation.vqgan_clip import METHODS

    assert get_args(Method) == METHODS


def test_analyze_paper_heads_literal_matches_the_table():
    from xclip.analysis.spurious import PAPER_HEADS

    assert get_args(analyze.PaperHeads) == tuple(PAPER_HEADS)


def test_suite_table_is_explicit():
    """Every suite module in evaluation/ is in the table (none discovered by name at run time)."""
    names = {p.stem for p in (ROOT / "evaluation").glob("*.py") if not p.stem.startswith("_")} - {"common"}
    assert names == {m.__name__.rsplit(".", 1)[1] for m in evaluate.SUITES}
    for m in evaluate.SUITES:
        assert callable(m.run) and m.NAME and m.HELP and m.Settings.__doc__
