"""The backbone factory: tiny models, local weights in open_clip's formats, and its errors."""
import json
import time

import pytest
import torch

from xclip.models.clip_backbone import TINY_CONFIG_DIR, BackboneError, build_clip


def test_tiny_model_encodes(tiny_backbone):
    img = tiny_backbone.normalize_pixels(torch.rand(2, 3, 32, 32))
    tok = tiny_backbone.tokenize(["a red star", "a blue circle"])
    assert tok.shape == (2, 32)
    fi, ft = tiny_backbone.encode_image(img), tiny_backbone.encode_text(tok)
    assert fi.shape == ft.shape == (2, 64)
    assert torch.allclose(fi.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_local_state_dict_round_trips(tmp_path, tiny_backbone):
    path = tmp_path / "w.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    b2 = build_clip("tiny-vit-test", str(path))
    for (k, v), v2 in zip(tiny_backbone.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(v, v2), k
    # open_clip's training checkpoints wrap the weights in {'state_dict': {'module.' + key: ...}}
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in tiny_backbone.model.state_dict().items()}},
               tmp_path / "epoch_1.pt")
    b3 = build_clip("tiny-vit-test", str(tmp_path / "epoch_1.pt"))
    assert torch.equal(b3.model.logit_scale, tiny_backbone.model.logit_scale)


def test_local_weights_do_not_log_random_init(tmp_path, tiny_backbone, caplog):
    """open_clip says 'initialized randomly' before our loader fills the weights; users must not see that."""
    path = tmp_path / "w.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    with caplog.at_level("WARNING"):
        build_clip("tiny-vit-test", str(path))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level("WARNING"):
        build_clip("tiny-vit-test", None)  # a genuinely random model still says so
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_local_dir_schema(tmp_path, tiny_backbone):
    from safetensors.torch import save_file

    cfg = json.loads((TINY_CONFIG_DIR / "tiny-vit-test.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    b = build_clip(f"local-dir:{tmp_path}")
    x = tiny_backbone.normalize_pixels(torch.rand(1, 3, 32, 32))
    assert torch.allclose(b.encode_image(x), tiny_backbone.encode_image(x), atol=1e-6)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BackboneError, match="Did you mean: ViT-B-32"):
        build_clip("ViT-B-3")


def test_offline_tag_fails_fast_with_howto():
    t0 = time.time()
    with pytest.raises(BackboneError) as e:
        build_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.time() - t0 < 2.0
    msg = str(e.value)
    assert "laion2b_s34b_b79k" in msg and "HF_HUB_OFFLINE" in msg and "local" in msg


def test_unknown_tag_lists_known_tags():
    with pytest.raises(BackboneError, match="openai"):
        build_clip("ViT-B-32", "not-a-tag")


def test_missing_truncated_and_mismatched_weights(tmp_path, tiny_backbone):
    with pytest.raises(BackboneError, match="not found"):
        build_clip("tiny-vit-test", str(tmp_path / "missing.pt"))
    good = tmp_path / "good.pt"
    torch.save(tiny_backbone.model.state_dict(), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(BackboneError, match="truncated.pt"):
        build_clip("tiny-vit-test", str(bad))
    with pytest.raises(BackboneError, match="does not match the architecture"):
        build_clip("tiny-vit-world", str(good))
