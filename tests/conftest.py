"""Test-wide settings: offline, CPU, tiny models, temp dirs."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random tiny open_clip (32 px, 2+2 layers); shared, so tests must not modify it."""
    from xclip.models.clip_backbone import build_clip

    torch.manual_seed(0)
    return build_clip("tiny-vit-test").freeze()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (large matmuls of real-size layouts; no oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
