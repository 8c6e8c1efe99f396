"""The `xclip` console script: every subcommand answers --help, and `xclip train` round-trips --print_config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xclip import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("sub", list(cli.SUBCOMMANDS))
def test_every_subcommand_answers_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_top_level_help_and_unknown_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(sub in out for sub in cli.SUBCOMMANDS)
    assert cli.main(["nonsense"]) == 2
    assert "unknown subcommand 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["configs/spelling/tiny_test.yaml", "configs/coop/tiny_test_expl.yaml",
                                    "configs/world/tiny_debug.yaml", "configs/styleclip/tiny_mapper.yaml"])
def test_train_print_config_round_trips(config, tmp_path, capsys):
    def printed(args: list[str]) -> str:
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "fit", *args, "--print_config"])
        assert e.value.code == 0
        return capsys.readouterr().out

    first = printed(["--config", str(REPO / config)])
    (tmp_path / "resolved.yaml").write_text(first)
    second = printed(["--config", str(tmp_path / "resolved.yaml")])
    assert yaml.safe_load(second) == yaml.safe_load(first)
