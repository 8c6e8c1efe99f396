"""Learn-to-spell / forget-to-spell: losses, projection module, checkpoints, direction of the effect."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xclip.losses.contrastive import (
    PAIRS,
    PRESETS,
    orthogonality_penalty,
    resolve_weights,
    spelling_objective,
    symmetric_infonce,
)
from xclip.metrics.spelling import PairedRetrieval, ZeroShotTop1, paired_retrieval_top1


# ---- losses ---------------------------------------------------------------------------------------------
def test_infonce_hand_computed_identity_pairs():
    a = torch.eye(2)
    # logits = I: each row CE = -1 + log(e^1 + e^0) = log(1 + e^-1), same in both directions
    assert symmetric_infonce(a, a).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_infonce_hand_computed_asymmetric():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    # logits = a b^T = [[0.6, 1.0], [0.8, 0.0]]
    rows = (-0.6 + math.log(math.exp(0.6) + math.exp(1.0))) + (-0.0 + math.log(math.exp(0.8) + 1.0))
    cols = (-0.6 + math.log(math.exp(0.6) + math.exp(0.8))) + (-0.0 + math.log(math.exp(1.0) + 1.0))
    expected = 0.5 * (rows / 2 + cols / 2)
    assert symmetric_infonce(a, b).item() == pytest.approx(expected, abs=1e-6)
    # scale multiplies the logits (default 1 = temperature 1, no CLIP logit scale)
    assert symmetric_infonce(a, b, scale=2.0).item() == pytest.approx(symmetric_infonce(2 * a, b).item(), abs=1e-6)


def test_infonce_random_features_near_log_n():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(128, 512, generator=g), dim=-1)
    b = F.normalize(torch.randn(128, 512, generator=g), dim=-1)
    assert symmetric_infonce(a, b).item() == pytest.approx(math.log(128), abs=0.05)


def test_infonce_shape_error():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        symmetric_infonce(torch.zeros(3, 4), torch.zeros(2, 4))


def test_orthogonality_penalty():
    W = torch.empty(16, 64)
    torch.nn.init.orthogonal_(W)
    assert orthogonality_penalty(W).item() < 1e-5
    # W = 2 * [I_k | 0]: ||I - 4 I||_F = 3 sqrt(k) (Frobenius norm, not squared)
    W2 = torch.cat([2 * torch.eye(4), torch.zeros(4, 3)], dim=1)
    assert orthogonality_penalty(W2).item() == pytest.approx(3 * math.sqrt(4), abs=1e-5)


def test_presets_follow_figure_numbering():
    assert PAIRS["L1"] == ("x_i", "x_it") and PAIRS["L4"] == ("x_t", "y_t") and PAIRS["L6"] == ("x_it", "y_i")
    assert set(PRESETS["learn_to_spell"]) == {"L3", "L4", "L5"}
    assert set(PRESETS["forget_to_spell"]) == {"L1", "L2", "L6"}
    w = resolve_weights("forget_to_spell", {"L5": -0.5, "L1": None})
    assert w == {"L1": 1.0, "L2": 1.0, "L3": 0.0, "L4": 0.0, "L5": -0.5, "L6": 1.0}
    with pytest.raises(ValueError, match="preset"):
        resolve_weights("forget")
    with pytest.raises(ValueError, match="L7"):
        resolve_weights(None, {"L7": 1.0})
    with pytest.raises(ValueError, match="zero"):
        resolve_weights(None, {})


def test_objective_is_weighted_sum_plus_reg():
    g = torch.Generator().manual_seed(1)
    feats = {e: F.normalize(torch.randn(8, 4, generator=g), dim=-1) for e in ("x_i", "y_i", "x_t", "y_t", "x_it")}
    W = torch.randn(4, 6, generator=g)
    weights = resolve_weights(None, {"L2": 2.0, "L5": -1.0})
    total, parts = spelling_objective(feats, weights, W, gamma=0.3)
    expected = 2 * symmetric_infonce(feats["x_i"], feats["y_i"]) - symmetric_infonce(feats["x_it"], feats["y_t"]) \
        + 0.3 * orthogonality_penalty(W)
    assert total.item() == pytest.approx(expected.item(), abs=1e-5)
    assert set(parts) == {"L2", "L5", "reg"}


# ---- metrics --------------------------------------------------------------------------------------------
def test_paired_retrieval_matches_naive_loop():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(20, 5, generator=g), torch.randn(20, 5, generator=g)
    sim = a @ b.t()
    naive_a2b = 100 * sum(int(max(range(20), key=lambda j: sim[i, j]) == i) for i in range(20)) / 20
    naive_b2a = 100 * sum(int(max(range(20), key=lambda i: sim[i, j]) == j) for j in range(20)) / 20
    assert paired_retrieval_top1(a, b) == pytest.approx((naive_a2b, naive_b2a))
    m = PairedRetrieval()
    real = torch.arange(20) % 2 == 0
    m.update(a[:7], b[:7], real[:7])
    m.update(a[7:], b[7:], real[7:])
    out = m.compute()
    assert out["real/a2b"].item() == pytest.approx(paired_retrieval_top1(a[real], b[real])[0])
    assert out["fake/b2a"].item() == pytest.approx(paired_retrieval_top1(a[~real], b[~real])[1])


def test_zero_shot_top1():
    cls = torch.eye(3)
    feats = torch.tensor([[1.0, 0, 0], [0, 0.2, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
    m = ZeroShotTop1()
    m.update(feats, cls, torch.tensor([0, 2, 1, 1]))
    assert m.compute().item() == pytest.approx(75.0)


# ---- the module -----------------------------------------------------------------------------------------
def _module(**kw):
    from xclip.lightning_modules.spelling import SpellingProjection

    return SpellingProjection("tiny-vit-test", None, **kw)


def test_module_w_shape_orthogonal_init_and_defaults():
    m = _module(preset="learn_to_spell")
    assert m.projection_matrix().shape == (64, 64)          # k default 64 for learn-to-spell, d = 64
    assert orthogonality_penalty(m.W.detach()).item() < 1e-4
    m2 = _module(preset="forget_to_spell", k=16)
    assert m2.W.shape == (16, 64)
    assert m2.loss_weights == {"L1": 1.0, "L2": 1.0, "L3": 0.0, "L4": 0.0, "L5": 0.0, "L6": 1.0}
    with pytest.raises(ValueError, match="give k"):
        _module(preset=None, l1=1.0)


def test_apply_projection_normalises_and_is_shape_aware():
    from xclip.lightning_modules.spelling import apply_projection

    W = torch.randn(8, 32)
    x = torch.randn(5, 32) * 3
    z = apply_projection(x, W)
    assert z.shape == (5, 8) and torch.allclose(z.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(apply_projection(x, W.t()), z, atol=1e-6)      # README's [d, k] layout
    assert torch.allclose(apply_projection(x, None), F.normalize(x, dim=-1))
    with pytest.raises(ValueError, match="does not fit"):
        apply_projection(x, torch.randn(8, 31))


def test_checkpoint_keeps_only_w_and_load_projection(tmp_path, one_thread):
    from _spelling_fixtures import synthetic_features

    from xclip.lightning_modules.base import load_method_checkpoint
    from xclip.lightning_modules.spelling import SpellingProjection, fit_on_features, load_projection

    m = _module(preset="forget_to_spell", k=16, lr=1e-2)
    trainer = fit_on_features(m, synthetic_features(64, 20, 0), None, max_epochs=1, batch_size=32)
    path = tmp_path / "w.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == {"W"}
    assert raw["backbone"] == {"name": "tiny-vit-test", "pretrained": None}
    assert raw["projection"]["k"] == 16 and raw["projection"]["d"] == 64
    W = load_projection(path, expected_backbone={"name": "tiny-vit-test", "pretrained": None})
    assert torch.equal(W, m.W.detach())
    with pytest.raises(ValueError, match="trained on backbone"):
        load_projection(path, expected_backbone={"name": "tiny-vit-world", "pretrained": "synthetic-world"})
    again = load_method_checkpoint(path, expected=SpellingProjection)
    assert torch.equal(again.projection_matrix(), m.W.detach())
    # the released code's format: a raw {'W': [k, d]} file
    torch.save({"W": torch.ones(4, 64)}, tmp_path / "raw.pth")
    assert load_projection(tmp_path / "raw.pth").shape == (4, 64)
    torch.save({"nothing": 1}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="'W'"):
        load_projection(tmp_path / "bad.pth")


def test_direction_on_structured_features(one_thread):
    """Forget-to-spell removes word information and keeps the class; learn-to-spell does the opposite."""
    import pytorch_lightning as pl
    from _spelling_fixtures import synthetic_features

    from xclip.lightning_modules.spelling import evaluate_features, fit_on_features

    train = synthetic_features(1024, 300, seed=0)
    val = synthetic_features(512, 400, seed=1, word_offset=1)        # unseen words
    base = evaluate_features(val, None)
    word, clean = "im_it_txt_t/real/img2txt", "acc_im_i_txt_i"
    pl.seed_everything(0)
    forget = _module(preset="forget_to_spell", k=16, lr=1e-2)
    trainer = fit_on_features(forget, train, val, max_epochs=8)
    f = evaluate_features(val, forget.projection_matrix().detach())
    assert f[word] < base[word] - 20 and f[clean] >= base[clean] - 1
    assert trainer.callback_metrics[f"val/{word}"].item() == pytest.approx(f[word], abs=1e-3)  # same suite
    pl.seed_everything(0)
    learn = _module(preset="learn_to_spell", k=32, lr=1e-2)
    fit_on_features(learn, train, None, max_epochs=8)
    s = evaluate_features(val, learn.projection_matrix().detach())
    assert s[word] > base[word] + 5 and s[clean] < base[clean] - 30
