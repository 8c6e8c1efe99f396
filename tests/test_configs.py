"""Every LightningCLI config in configs/ parses (class paths import, keys match the typed __init__ signatures)."""
from pathlib import Path

import pytest
import yaml

from xclip import train

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if isinstance(d := yaml.safe_load(p.read_text()), dict) and "model" in d and "trainer" in d)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_parses(path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(path), "--print_config"])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err[-2000:]
    assert "class_path" in out.out
