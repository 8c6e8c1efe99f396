"""TextSpan: decomposition sums to the embedding, TEXTSPAN recovers planted directions, mean-ablation."""
import pytest
import torch
import torch.nn.functional as F

from xclip.analysis.ablation import (
    AblationSpec,
    ablated_embeddings,
    ablation_table,
    dataset_means,
    parse_heads,
    zero_shot_accuracy,
)
from xclip.analysis.decomposition import DecompositionError, decompose_images
from xclip.analysis.textspan import textspan


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Random-init open_clip leaves biases at 0 and LN at identity; perturb every parameter so the test bites."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _check_sum(visual, image_size: int, batch: int = 2, tol: float = 1e-4):
    visual.eval()
    x = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        ref = F.normalize(visual(x), dim=-1)                                # stock forward
    dec = decompose_images(visual, x, per_token_head=True)
    assert (dec.total() - ref).abs().max() < tol
    assert torch.equal(dec.embedding, ref)                                   # outputs unchanged by the hooks
    with torch.no_grad():
        assert torch.equal(F.normalize(visual(x), dim=-1), ref)              # hooks removed, model untouched
    # the views agree: per (token, head) pieces -> heads / tokens
    assert (dec.per_token_head.sum(3) - dec.tokens).abs().max() < 1e-5           # [B, L, N, D]
    assert (dec.per_token_head.sum(2) - dec.heads).abs().max() < 1e-5            # [B, L, H, D]
    L, H = dec.meta["layers"], dec.meta["heads"]
    assert dec.heads.shape == (batch, L, H, ref.shape[1]) and dec.mlps.shape == (batch, L + 1, ref.shape[1])
    return dec


def test_sum_to_embedding_tiny(tiny_backbone):
    import copy

    visual = copy.deepcopy(tiny_backbone.model.visual)
    _perturb(visual)
    _check_sum(visual, tiny_backbone.image_size, batch=3)


def test_sum_to_embedding_layerscale_and_final_ln_after_pool():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=48, layers=3, heads=4, mlp_ratio=2.0,
                               ls_init_value=0.3, output_dim=24, final_ln_after_pool=True)
    _perturb(visual)
    _check_sum(visual, 32)


def test_sum_to_embedding_midsize():
    """ViT-B-16 geometry except depth/width (fast): 224 px, patch 16 -> 197 tokens, 12 heads of 64."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=224, patch_size=16, width=768, layers=2, heads=12, mlp_ratio=1.0,
                               output_dim=512)
    _perturb(visual, 0.01)
    dec = _check_sum(visual, 224, batch=1)
    assert dec.meta["tokens"] == 197


@pytest.mark.slow
def test_sum_to_embedding_vit_b16():
    from xclip.models.clip_backbone import build_clip

    torch.manual_seed(0)
    visual = build_clip("ViT-B-16").model.visual
    _perturb(visual, 0.005)
    _check_sum(visual, 224, batch=2)


def test_unsupported_model_fails_clearly():
    from open_clip.transformer import VisionTransformer

    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                               output_dim=16, pool_type="avg").eval()
    with pytest.raises(DecompositionError, match="pool_type"):
        decompose_images(visual, torch.randn(1, 3, 32, 32))


# ---- TEXTSPAN ------------------------------------------------------------------------------------------------
def _planted_problem(seed: int = 0, K: int = 400, D: int = 32, n_planted: int = 4, n_distract: int = 60):
    g = torch.Generator().manual_seed(seed)
    planted = F.normalize(torch.randn(n_planted, D, generator=g), dim=-1)      # [P, D]
    scales = torch.tensor([5.0, 4.0, 3.0, 2.0])[:n_planted]
    coef = torch.randn(K, n_planted, generator=g) * scales                     # [K, P]
    mean = torch.randn(D, generator=g)
    data = mean + coef @ planted + 0.01 * torch.randn(K, D, generator=g)       # [K, D] rank-limited head output
    distract = F.normalize(torch.randn(n_distract, D, generator=g), dim=-1)
    pool = torch.cat([distract[: n_distract // 2], planted, distract[n_distract // 2:]])
    planted_idx = list(range(n_distract // 2, n_distract // 2 + n_planted))
    return data, pool, planted_idx


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_textspan_recovers_planted_directions(seed):
    data, pool, planted_idx = _planted_problem(seed)
    res = textspan(data, pool, m=4, rank=6)
    assert res.indices == planted_idx                       # in order of variance (5 > 4 > 3 > 2)
    assert (res.reconstruction - data).abs().max() < 0.1   # mean + 4 directions reconstructs the head
    assert res.variances == sorted(res.variances, reverse=True)


def test_textspan_deflation_never_repeats_and_projects():
    data, pool, _ = _planted_problem(0)
    res = textspan(data, pool, m=10, rank=6)
    assert len(set(res.indices)) == 10
    # with m >= rank, the reconstruction spans the whole (centred) head output: it equals the data
    assert (res.reconstruction - data).abs().max() < 0.1
    with pytest.raises(ValueError, match="m=100"):
        textspan(data, pool, m=100)


def test_textspan_rank_projection_keeps_texts_in_head_span():
    from xclip.analysis.textspan import project_onto_top_singular

    data, pool, _ = _planted_problem(3)
    proj = project_onto_top_singular(data, pool, rank=5)       # mean direction + 4 planted directions
    _, _, vh = torch.linalg.svd(data, full_matrices=False)
    outside = vh[5:]                                            # the head's (near-)null output directions
    assert (proj @ outside.T).abs().max() < 1e-5
    assert torch.allclose(project_onto_top_singular(data, proj, rank=5), proj, atol=1e-5)   # idempotent


# ---- mean-ablation on constructed contributions --------------------------------------------------------------
def _constructed_contribs(K: int = 200, L: int = 4, H: int = 2, D: int = 16, C: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    classifier = F.normalize(torch.randn(D, C, generator=g), dim=0)             # [D, C]
    labels = torch.randint(0, C, (K,), generator=g)
    heads = torch.zeros(K, L, H, D)
    heads[:, :-1] = 0.05 * torch.randn(L - 1, H, D, generator=g)                    # constant over images
    heads[:, -1, 0] = 3 * classifier.T[labels]                                  # class signal in last layer
    heads[:, -1, 1] = 0.1 * torch.randn(K, D, generator=g)
    mlps = 0.05 * torch.randn(L + 1, D, generator=g).expand(K, L + 1, D).clone()      # constant too
    return heads, mlps, classifier, labels


def test_mean_ablation_constant_components_change_nothing():
    heads, mlps, classifier, labels = _constructed_contribs()
    means = dataset_means(heads, mlps)
    base = ablated_embeddings(heads, mlps, AblationSpec(), means)
    assert torch.allclose(base, heads.sum((1, 2)) + mlps.sum(1), atol=1e-5)
    abl = ablated_embeddings(heads, mlps, AblationSpec(layers=[0, 1, 2], mlps=True), means)
    assert torch.allclose(abl, base, atol=1e-5)                     # constant components: provably unchanged
    assert zero_shot_accuracy(base, classifier, labels) == 1.0


def test_mean_ablation_signal_head_drops_accuracy():
    heads, mlps, classifier, labels = _constructed_contribs()
    table = ablation_table(heads, mlps, classifier, labels, keep_last=[1])
    assert table["baseline"] == 1.0 and table["all_but_last_1"] == 1.0 and table["mlps_ablated"] == 1.0
    curve = table["accumulated_layers"]
    assert len(curve) == 5 and curve[:4] == [1.0] * 4 and curve[4] < 0.5     # collapses with the last layer
    means = dataset_means(heads, mlps)
    one = ablated_embeddings(heads, mlps, AblationSpec(heads=parse_heads("3:0")), means)
    assert zero_shot_accuracy(one, classifier, labels) < 0.5
    with pytest.raises(ValueError, match="out of range"):
        ablated_embeddings(heads, mlps, AblationSpec(heads=[(4, 0)]), means)
