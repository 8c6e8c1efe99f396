"""OpenAI's and open_clip's CLIP files, in the exact layouts users hold, load into the model OpenAI trained.

The reference is open_clip's ``ViT-B-32-quickgelu`` model loaded with the same tensors (built here directly
through open_clip, not through ``build_clip``). OpenAI's layouts, written by these tests:

- the plain state dict of OpenAI's ``clip`` package: open_clip's key names (open_clip mirrors OpenAI's modules),
  linear/conv/attention weights and ``text_projection`` / ``visual.proj`` in fp16 (OpenAI's ``convert_weights``),
  plus three integer entries ``input_resolution``, ``context_length``, ``vocab_size`` (0-d int64 tensors);
- the TorchScript archive that package caches as ``~/.cache/clip/ViT-B-32.pt``: a traced module whose
  ``state_dict()`` holds exactly those entries (the attention mask is a traced constant, not state).

The fast tests use ViT-B-32's layout at a small width (same names, same logic); the slow one the real size.
"""
from __future__ import annotations

import copy
import logging
import time
import zipfile
from pathlib import Path
from typing import Tuple

import open_clip
import pytest
import torch
from torch import nn

from xclip.models.clip_backbone import BackboneError, build_clip, choose_activation, is_torchscript_archive

TINY_B32 = dict(embed_dim=32, vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=32, head_width=32),
                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
LOGGER = "xclip.models.clip_backbone"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- writing OpenAI's layouts -------------------------------------------------------------------------------
def _half_names(model: nn.Module) -> set[str]:
    """The tensors OpenAI's ``convert_weights`` stores in fp16."""
    names = set()
    for mod_name, mod in model.named_modules():
        pre = f"{mod_name}." if mod_name else ""
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names |= {pre + "weight", pre + "bias"}
        if isinstance(mod, nn.MultiheadAttention):
            names |= {pre + a for a in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                        "in_proj_bias", "bias_k", "bias_v")}
        names |= {pre + a for a in ("text_projection", "proj") if isinstance(getattr(mod, a, None), torch.Tensor)}
    return names


def openai_extras(model: nn.Module) -> dict[str, int]:
    size = model.visual.image_size
    return {"input_resolution": int(size[0] if isinstance(size, (tuple, list)) else size),
            "context_length": int(model.context_length), "vocab_size": int(model.vocab_size)}


def openai_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI's plain state dict of ``model``: same keys, fp16 where OpenAI has it, the three integer entries."""
    half = _half_names(model)
    sd = {k: (v.half() if k in half else v.clone()) for k, v in model.state_dict().items()}
    extras = {k: torch.tensor(v) for k, v in openai_extras(model).items()}
    first = ["positional_embedding", "text_projection", "logit_scale"]  # OpenAI's order: ints after these
    return {**{k: sd[k] for k in first}, **extras, **{k: v for k, v in sd.items() if k not in first}}


def write_openai_torchscript(model: nn.Module, path: Path) -> Path:
    """A TorchScript archive like OpenAI's: traced encode_image / encode_text, integer entries as buffers."""
    m = copy.deepcopy(model).eval()
    mask = m._buffers.pop("attn_mask", None)
    if mask is not None:
        object.__setattr__(m, "attn_mask", mask)  # a plain attribute: traced as a constant, as in OpenAI's archive
    for k, v in openai_extras(model).items():
        m.__dict__.pop(k, None)
        m.register_buffer(k, torch.tensor(v))
    half = _half_names(model)
    size = openai_extras(model)["input_resolution"]
    img, tok = torch.zeros(1, 3, size, size), torch.zeros(1, int(model.context_length), dtype=torch.long)
    traced = torch.jit.trace_module(m, {"encode_image": (img,), "encode_text": (tok,)}, check_trace=False)
    for name, p in traced.named_parameters():
        if name in half:
            p.data = p.data.half()
    torch.jit.save(traced, str(path))
    return path


def reference(name: str, state: dict[str, torch.Tensor], **cfg) -> nn.Module:
    """open_clip's own model of ``name`` with ``state`` loaded (OpenAI's integer entries dropped)."""
    model = open_clip.create_model(name, **cfg).eval()
    model.load_state_dict({k: v for k, v in state.items() if k not in ("input_resolution", "context_length",
                                                                       "vocab_size")})
    return model


def features(model: nn.Module, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [1, D], text [1, D]) features of one fixed image and one caption."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    tok = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"])
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(tok)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """Random weights at ViT-B-32's layout (small width), built by open_clip's QuickGELU class."""
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32-quickgelu", **TINY_B32).eval()


def _assert_openai_model(backbone, state, size: int) -> None:
    """QuickGELU, equal to open_clip's -quickgelu reference, and far from what GELU would give."""
    assert backbone.activation == "quick_gelu" and backbone.spec()["activation"] == "quick_gelu"  # new cache keys
    ref = reference("ViT-B-32-quickgelu", state, **(TINY_B32 if size == 64 else {}))
    gelu = reference("ViT-B-32", state, **(TINY_B32 if size == 64 else {}))
    (fi, ft), (ri, rt), (gi, gt) = features(backbone.model, size), features(ref, size), features(gelu, size)
    assert rel(fi, ri) < 1e-6 and rel(ft, rt) < 1e-6, (rel(fi, ri), rel(ft, rt))
    # the test has teeth: a GELU model on the same tensors is measurably different
    assert rel(gi, ri) > 1e-3 and rel(gt, rt) > 1e-3, (rel(gi, ri), rel(gt, rt))
    assert rel(fi, gi) > 1e-3 and rel(ft, gt) > 1e-3


# ---- OpenAI's plain state dict ------------------------------------------------------------------------------
def test_openai_state_dict_gets_quickgelu(tmp_path, source, caplog):
    state = openai_state_dict(source)
    torch.save(state, tmp_path / "ViT-B-32-state.pt")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = build_clip("ViT-B-32", str(tmp_path / "ViT-B-32-state.pt"), **TINY_B32)  # the plain GELU name
    _assert_openai_model(b, state, 64)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and "activation" in r.getMessage()]
    assert len(lines) == 1 and "QuickGELU" in lines[0] and "OpenAI's layout" in lines[0], lines
    assert b.model.visual.conv1.weight.dtype == torch.float32  # fp16 entries are loaded into the fp32 model


def test_openai_integer_entries_are_checked(tmp_path, source):
    state = openai_state_dict(source)
    torch.save({**state, "input_resolution": torch.tensor(224)}, tmp_path / "wrong.pt")
    with pytest.raises(BackboneError, match=r"wrong.pt: input_resolution=224 .* input_resolution=64"):
        build_clip("ViT-B-32", str(tmp_path / "wrong.pt"), **TINY_B32)
    torch.save({**state, "vocab_size": torch.tensor(1000)}, tmp_path / "vocab.pt")
    with pytest.raises(BackboneError, match=r"vocab_size=1000 .* vocab_size=49408"):
        build_clip("ViT-B-32", str(tmp_path / "vocab.pt"), **TINY_B32)
    torch.save({**state, "context_length": torch.tensor([77.0])}, tmp_path / "float.pt")
    with pytest.raises(BackboneError, match="'context_length' should be an integer"):
        build_clip("ViT-B-32", str(tmp_path / "float.pt"), **TINY_B32)
    ints = {k: (int(v) if k in ("input_resolution", "context_length", "vocab_size") else v) for k, v in state.items()}
    torch.save(ints, tmp_path / "python_ints.pt")  # plain Python ints are accepted too
    assert build_clip("ViT-B-32", str(tmp_path / "python_ints.pt"), **TINY_B32).activation == "quick_gelu"


# ---- OpenAI's TorchScript archive ---------------------------------------------------------------------------
def test_openai_torchscript_archive_is_read_through_jit(tmp_path, source, monkeypatch):
    path = write_openai_torchscript(source, tmp_path / "ViT-B-32.pt")
    names = zipfile.ZipFile(path).namelist()
    assert any("/code/" in n for n in names) and is_torchscript_archive(path)  # a real TorchScript zip
    state = {k: v for k, v in torch.jit.load(str(path)).state_dict().items()}
    assert set(state) == set(openai_state_dict(source))  # exactly OpenAI's entries
    jit_calls = []
    real_jit_load, real_load = torch.jit.load, torch.load

    def spy_jit(p, *a, **k):
        jit_calls.append(str(p))
        return real_jit_load(p, *a, **k)

    def no_unpickling(p, *a, **k):
        assert Path(str(p)) != path, "the TorchScript archive must not go through torch.load"
        return real_load(p, *a, **k)

    monkeypatch.setattr(torch.jit, "load", spy_jit)
    monkeypatch.setattr(torch, "load", no_unpickling)
    b = build_clip("ViT-B-32", str(path), **TINY_B32)
    assert jit_calls == [str(path)]
    _assert_openai_model(b, state, 64)


class _SetstateModule(nn.Module):
    """A TorchScript module whose __setstate__ runs while the archive loads."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.w = state[0] + 1
        self.training = state[1]


def test_torchscript_with_setstate_is_refused(tmp_path, monkeypatch):
    torch.jit.save(torch.jit.script(_SetstateModule()), str(tmp_path / "hostile.pt"))
    path = tmp_path / "hostile.pt"
    called = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: called.append(a))
    with pytest.raises(BackboneError, match="__setstate__"):
        build_clip("ViT-B-32", str(path), **TINY_B32)
    assert not called  # refused before TorchScript loads anything


# ---- the openai tag: OpenAI's download cache, the HF cache ---------------------------------------------------
def _isolated_caches(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / ".cache" / "clip"


def test_openai_clip_package_cache_serves_the_openai_tag(tmp_path, source, monkeypatch, caplog):
    cache = _isolated_caches(monkeypatch, tmp_path)
    cache.mkdir(parents=True)
    write_openai_torchscript(source, cache / "ViT-B-32.pt")  # where OpenAI's clip package (and open_clip) cache it
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = build_clip("ViT-B-32", "openai", **TINY_B32)
    state = dict(torch.jit.load(str(cache / "ViT-B-32.pt")).state_dict())
    _assert_openai_model(b, state, 64)
    text = " ".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert "ViT-B-32.pt" in text and "tag 'openai'" in text


def test_hf_cache_file_of_the_openai_tag_gets_quickgelu(tmp_path, source, monkeypatch, caplog):
    """open_clip's own format (as the HF hub serves the openai tag): the tag, not the keys, says QuickGELU."""
    from safetensors.torch import save_file

    _isolated_caches(monkeypatch, tmp_path)
    repo = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    sha = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(repo / "snapshots" / sha / "open_clip_model.safetensors"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = build_clip("ViT-B-32", "openai", **TINY_B32)
    _assert_openai_model(b, state, 64)
    assert any("open_clip_model.safetensors" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_local_dir_with_openai_archive(tmp_path, source):
    import json

    folder = tmp_path / "openai_b32"
    folder.mkdir()
    cfg = {**open_clip.get_model_config("ViT-B-32"), **copy.deepcopy(TINY_B32)}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    write_openai_torchscript(source, folder / "ViT-B-32.pt")
    b = build_clip(f"local-dir:{folder}")
    _assert_openai_model(b, dict(torch.jit.load(str(folder / "ViT-B-32.pt")).state_dict()), 64)


def test_cached_hf_hub_repo_is_read_locally_without_network(tmp_path, source, monkeypatch):
    """hf-hub:ORG/REPO in the HF cache, HF_HUB_OFFLINE unset, no network: read from the snapshot at once."""
    import json

    from safetensors.torch import save_file

    from xclip.utils import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_probe_cache", {})
    repo, sha = tmp_path / "hub" / "models--me--clip-b32-openai", "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    cfg = {**open_clip.get_model_config("ViT-B-32"), **copy.deepcopy(TINY_B32), "quick_gelu": True}
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(snap / "open_clip_model.safetensors"))
    t0 = time.monotonic()
    b = build_clip("hf-hub:me/clip-b32-openai")
    assert time.monotonic() - t0 < 15
    _assert_openai_model(b, state, 64)


# ---- the knob and the mismatches ------------------------------------------------------------------------------
def test_open_clip_file_needs_the_knob_and_gelu_against_evidence_is_an_error(tmp_path, source, caplog):
    state = source.state_dict()
    torch.save(state, tmp_path / "converted.pt")  # OpenAI's weights in open_clip's format: keys say nothing
    with caplog.at_level(logging.INFO, logger=LOGGER):
        plain = build_clip("ViT-B-32", str(tmp_path / "converted.pt"), **TINY_B32)
    assert plain.activation == "gelu" and "activation" not in plain.spec()
    hint = [r.getMessage() for r in caplog.records if r.name == LOGGER and "activation" in r.getMessage()]
    assert "ViT-B-32-quickgelu" in hint[-1] and "activation='quick_gelu'" in hint[-1]
    _assert_openai_model(build_clip("ViT-B-32-quickgelu", str(tmp_path / "converted.pt"), **TINY_B32), state, 64)
    _assert_openai_model(build_clip("ViT-B-32", str(tmp_path / "converted.pt"), activation="quick_gelu",
                                    **TINY_B32), state, 64)
    torch.save(openai_state_dict(source), tmp_path / "openai.pt")
    with pytest.raises(BackboneError, match=r"activation='gelu' contradicts .*OpenAI's layout.*'auto'"):
        build_clip("ViT-B-32", str(tmp_path / "openai.pt"), activation="gelu", **TINY_B32)
    with pytest.raises(BackboneError, match=r"contradicts .*'ViT-B-32' without '-quickgelu'"):
        build_clip("ViT-B-32-quickgelu", str(tmp_path / "converted.pt"), activation="gelu", **TINY_B32)
    with pytest.raises(BackboneError, match="activation must be one of"):
        build_clip("ViT-B-32", str(tmp_path / "converted.pt"), activation="relu", **TINY_B32)


def test_every_openai_tag_resolves_to_quickgelu():
    """The tag alone decides (before any file is read): the plain GELU name is corrected, with the reason."""
    from open_clip import pretrained as oc_pre

    for name in oc_pre.list_pretrained_models_by_tag("openai"):
        quick, why = choose_activation("auto", name, tag="openai",
                                       tag_quick_gelu=bool(oc_pre.get_pretrained_cfg(name, "openai")["quick_gelu"]))
        assert quick and "tag 'openai'" in why, name
    with pytest.raises(BackboneError, match="contradicts"):
        choose_activation("gelu", "ViT-B-32", tag="openai", tag_quick_gelu=True)
    assert choose_activation("auto", "ViT-B-32", tag="laion2b_s34b_b79k", tag_quick_gelu=False)[0] is False


# ---- offline without HF_HUB_OFFLINE: fail in seconds, say where and how ----------------------------------------
@pytest.mark.parametrize("endpoint", ["https://127.0.0.1:9", "https://10.255.255.1"])  # refused / silent
def test_unreachable_hub_fails_fast_without_the_offline_variable(tmp_path, monkeypatch, endpoint):
    from xclip.utils import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # unreachable on any machine (CI has no network at all)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_probe_cache", {})
    t0 = time.monotonic()
    with pytest.raises(BackboneError) as e:
        build_clip("ViT-B-32", "openai")
    assert time.monotonic() - t0 < 15
    msg = str(e.value)
    assert str(tmp_path / "hub") in msg and "timm/vit_base_patch32_clip_224.openai" in msg
    assert str(tmp_path / ".cache" / "clip" / "ViT-B-32.pt") in msg
    assert "unreachable" in msg and "--pretrained /path/to/ViT-B-32.pt" in msg and "local-dir:" in msg


def test_train_prints_the_backbone_error_not_the_union_dump(monkeypatch, tmp_path, capsys):
    from xclip import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = Path(train.__file__).parent / "configs" / "coop" / "imagenet_16shot.yaml"
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(cfg), "--trainer.logger", "false"])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Pretrained weights 'ViT-B-32'/'openai' are not in the local caches" in err
    assert "Union subtypes" not in err and "Given value" not in err and len(err.splitlines()) < 10


# ---- the real size ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_size_vit_b_32_openai_files(tmp_path):
    """ViT-B-32 at OpenAI's configuration (151 M params): plain state dict and TorchScript archive."""
    torch.manual_seed(0)
    src = open_clip.create_model("ViT-B-32-quickgelu").eval()
    state = openai_state_dict(src)
    torch.save(state, tmp_path / "state.pt")
    _assert_openai_model(build_clip("ViT-B-32", str(tmp_path / "state.pt")), state, 224)
    write_openai_torchscript(src, tmp_path / "ViT-B-32.pt")
    b = build_clip("ViT-B-32", str(tmp_path / "ViT-B-32.pt"))
    _assert_openai_model(b, dict(torch.jit.load(str(tmp_path / "ViT-B-32.pt")).state_dict()), 224)
