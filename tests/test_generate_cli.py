"""`xclip generate` / `xclip demo` grammar: every generation config parses, every subcommand round-trips
--print_config, list flags replace config lists, one name per concept."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xclip import demo, generate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# config file pattern -> the generate subcommand that reads it (training configs, with model + trainer, are
# LightningCLI's: tests/test_configs.py)
OWNERS = {"vqgan/*.yaml": "vqgan-clip", "zerocap/*.yaml": "zerocap",
          "styleclip/optimize_*.yaml": "styleclip-optimize", "styleclip/global_*.yaml": "styleclip-global",
          "styleclip/apply_mapper_*.yaml": "styleclip-mapper"}
GEN_CONFIGS = sorted((p, sub) for pattern, sub in OWNERS.items() for p in CONFIGS.glob(pattern))


def _is_training_config(path: Path) -> bool:
    d = yaml.safe_load(path.read_text())
    return isinstance(d, dict) and "model" in d and "trainer" in d


def test_every_generation_config_has_a_subcommand():
    for folder in ("vqgan", "zerocap", "styleclip"):
        for path in sorted((CONFIGS / folder).glob("*.yaml")):
            owned = any(path.match(str(CONFIGS / pattern)) for pattern in OWNERS)
            assert owned or _is_training_config(path), f"{path} is read by no subcommand"
    assert {sub for _, sub in GEN_CONFIGS} == set(generate.SUBCOMMANDS)  # every subcommand has a config


@pytest.mark.parametrize("path,sub", GEN_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p, _ in GEN_CONFIGS])
def test_generation_config_parses(path, sub, tmp_path, capsys):
    name, cfg = generate.parse([sub, "--config", str(path)])
    want = yaml.safe_load(path.read_text())
    flat = cfg.clone()
    for key, value in want.items():  # every key of the file reaches the namespace, with its value
        got = flat[key]
        if isinstance(value, dict):
            for k, v in value.items():
                assert got[k] == v, (key, k)
        else:
            assert got == value, key
    # and the config round-trips through --print_config
    with pytest.raises(SystemExit) as e:
        generate.main([sub, "--config", str(path), "--print_config"])
    assert e.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    _, again = generate.parse([sub, "--config", str(printed)])
    assert _settings(again) == _settings(cfg)


def _settings(ns) -> dict:
    d = ns.as_dict()
    d.pop("config", None)
    return d


@pytest.mark.parametrize("sub", list(generate.SUBCOMMANDS))
def test_print_config_round_trips(sub, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main([sub, "--print_config"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    printed = tmp_path / f"{sub}.yaml"
    printed.write_text(text)
    assert "config" not in yaml.safe_load(text)
    _, default = generate.parse([sub])
    _, again = generate.parse([sub, "--config", str(printed)])
    assert _settings(again) == _settings(default)


def test_demo_print_config_round_trips(tmp_path, capsys):
    args = ["--out", str(tmp_path / "d"), "--fast", "true", "--n_attack", "30",
            "--train_overrides", '["--model.init_args.k=32"]']
    with pytest.raises(SystemExit) as e:
        demo.main([*args, "--print_config"])
    assert e.value.code == 0
    printed = tmp_path / "demo.yaml"
    printed.write_text(capsys.readouterr().out)
    assert _settings(demo.parse_args(["--config", str(printed)])) == _settings(demo.parse_args(args))
    assert not (tmp_path / "d").exists()  # printing the config does no work


def test_demo_configs_parse():
    paths = sorted((CONFIGS / "demo").glob("*.yaml"))
    assert paths
    for path in paths:
        ns = demo.parse_args(["--config", str(path)])
        for key, value in yaml.safe_load(path.read_text()).items():
            assert ns[key] == value, (path, key)
        assert demo.train_argv(ns)[:2] == ["fit", "--config"]


def test_cli_list_replaces_config_list(tmp_path):
    cfg = tmp_path / "v.yaml"
    cfg.write_text("prompts: ['0,0,16,32=a red circle', 'a blue square']\n")
    _, ns = generate.parse(["vqgan-clip", "--config", str(cfg), "--prompts", "0,0,8,8=a dog"])
    assert ns.prompts == ["0,0,8,8=a dog"]
    _, ns = generate.parse(["styleclip-global", "--config", str(CONFIGS / "styleclip/global_smile.yaml"),
                            "--alpha", "2", "-3"])
    assert ns.alpha == [2.0, -3.0]


def test_choices_are_literals(capsys):
    with pytest.raises(SystemExit):
        generate.parse(["vqgan-clip", "--method", "explainabilty"])
    err = capsys.readouterr().err
    assert "explainabilty" in err and "explainability" in err


def test_one_name_for_the_explainability_weight():
    """NTLB's explainability weight is expl_weight in every grammar (CoOp configs, VQGAN, StyleCLIP)."""
    skip = {"runs", "outputs", "results", "cache", "data", "wandb", "checkpoints"}
    sources = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".yaml", ".md") and p.is_file()
               and not skip & set(rel := p.relative_to(ROOT).parts) and not any(q.startswith(".") for q in rel)]
    offenders = [str(p.relative_to(ROOT)) for p in sources if p.name != Path(__file__).name
                 and ("expl_lambda" in (t := p.read_text(errors="ignore")) or "expl-lambda" in t)]
    assert len(sources) > 50 and not offenders, offenders
    _, ns = generate.parse(["styleclip-optimize", "--expl_weight", "1.0"])
    assert ns.expl_weight == 1.0
    _, ns = generate.parse(["vqgan-clip", "--expl_weight", "0.3"])
    assert ns.expl_weight == 0.3


def test_zerocap_preset_configs_equal_the_task_presets():
    from xclip.generation.zerocap import ZeroCapConfig

    for task in ("caption", "knowledge", "ocr", "arithmetic"):
        _, ns = generate.parse(["zerocap", "--config", str(CONFIGS / "zerocap" / f"{task}.yaml")])
        want = ZeroCapConfig.for_task(task)
        for key in ("cond_text", "end_factor", "fusion_factor", "grad_norm_factor"):
            assert ns[key] == getattr(want, key), (task, key)
