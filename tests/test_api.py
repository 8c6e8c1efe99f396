"""The curated public API (`import xclip`): every name resolves, the import is light, suites are functions."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import xclip


def test_every_public_name_resolves():
    missing = [n for n in xclip.__all__ if not hasattr(xclip, n)]
    assert not missing, missing
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        xclip.nonexistent  # noqa: B018


def test_import_is_light():
    code = "import sys, xclip; print(sorted(m for m in ('pytorch_lightning', 'transformers', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_run_suite_equals_the_cli(tmp_path):
    clip = xclip.build_clip("tiny-vit-world", "synthetic-world")
    res = xclip.run_suite("world", clip, n=40, words=20)
    from xclip import evaluate

    evaluate.main(["--backbone", "tiny-vit-world", "--pretrained", "synthetic-world", "--suite", "world",
                   "--world.n", "40", "--world.words", "20", "--out", str(tmp_path / "r.json")])
    cli = json.loads((tmp_path / "r.json").read_text())["suites"]["world"]
    for key, value in res.items():
        if key != "seconds" and isinstance(value, float):
            assert cli[key] == pytest.approx(value), key
    with pytest.raises(ValueError, match="valid suites: world"):
        xclip.run_suite("nope", clip)
