"""The package as a user installs it: one top-level name (`xclip`), data files inside, importable from anywhere."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERIC = {"models", "utils", "metrics", "losses", "lightning_modules", "datamodules", "generation", "analysis",
           "evaluation", "tests", "benchmarks", "configs"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the tracked tree (the build must not write into the repository)."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (whl,) = out.glob("xclip-*.whl")
    return whl


def test_wheel_installs_only_xclip_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"xclip", f"{wheel.name.split('-py3')[0]}.dist-info"}, tops
    assert not tops & GENERIC
    for needed in ("xclip/checkpoints/tiny_clip_world.pt", "xclip/models/model_configs/tiny-vit-world.json",
                   "xclip/configs/spelling/forget_to_spell_world.yaml", "xclip/cli.py", "xclip/train.py"):
        assert needed in names, needed
    assert not any(n.startswith("xclip/tests/") or n.startswith("xclip/benchmarks/") for n in names)
    entry = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    assert "xclip = xclip.cli:main" in entry


def test_installed_package_runs_from_any_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}            # the unpacked wheel wins over the editable install
    code = ("import xclip, pathlib; p = pathlib.Path(xclip.__file__).parent; assert str(p).startswith(%r), p; "
            "assert (p / 'configs').is_dir(); import xclip.cli; "
            "print(xclip.build_clip('tiny-vit-world', 'synthetic-world').spec())" % str(site))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tiny-vit-world" in res.stdout
    res = subprocess.run([sys.executable, "-m", "xclip.cli", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "explain" in res.stdout, res.stderr[-2000:]
    # `xclip explain` on the world CLIP with the packaged example config, from an unrelated folder
    cfg = site / "xclip" / "configs" / "explain" / "world_example.yaml"
    res = subprocess.run([sys.executable, "-m", "xclip.cli", "explain", "--config", str(cfg), "--out",
                          str(tmp_path / "explain"), "--html", "false"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "explain" / "explain.png").stat().st_size > 10_000


def test_no_sys_path_manipulation_left():
    offenders = []
    for p in REPO.rglob("*.py"):
        if {".venv", ".git", "build"} & set(p.parts):
            continue
        if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text():
            offenders.append(str(p.relative_to(REPO)))
    offenders = [o for o in offenders if o != "tests/test_package.py"]
    assert not offenders, offenders


def test_version_has_one_source_and_the_wheel_carries_it(wheel):
    """pyproject.toml names no version of its own: it reads xclip.__version__, which the built wheel then carries."""
    import tomllib

    import xclip

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "xclip.__version__"}
    assert wheel.name.startswith(f"xclip-{xclip.__version__}-")
    dist_info = f"{wheel.name.split('-py3')[0]}.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert f"\nVersion: {xclip.__version__}\n" in metadata
