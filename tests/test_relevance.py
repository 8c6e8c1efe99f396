"""Relevance engine: capture parity, batched == per-pair reference, gradients, embeddings entry, words, errors."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from xclip.models.relevance import (
    RelevanceError,
    capture_attention,
    encode_text_from_embeddings,
    image_relevance,
    normalise_token_relevance,
    patch_grid,
    relevance,
    text_eot_index,
    text_relevance,
    text_relevance_from_embeddings,
    word_relevance,
    word_token_spans,
    words_token_mask,
)

TEXTS = ["a photo of a dog.", "a red square", "hello world, this is a longer caption"]


# ------------------------------------------------------------------------------------------ reference rule
def reference_pair(backbone, image: torch.Tensor, token_row: torch.Tensor, tower: str, start_layer: int,
                   score: str = "logit") -> torch.Tensor:
    """The rule for ONE (image, text) pair, written out plainly: full-length text, full R matrix, per-layer grads."""
    model = backbone.model
    with capture_attention(model, (tower,)) as store:
        x = image.unsqueeze(0).clone().requires_grad_(True)  # [1, 3, H, W]
        emb = model.token_embedding(token_row.unsqueeze(0)).detach().requires_grad_(True)  # [1, L, W]
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = encode_text_from_embeddings(model, emb, token_row.argmax().view(1))
        txt = F.normalize(txt, dim=-1)
        y = (img * txt).sum()
        if score == "logit":
            y = y * model.logit_scale.exp()
    probs = store[tower]
    n = len(probs)
    start = start_layer + n if start_layer < 0 else start_layer
    N = probs[0].shape[-1]
    R = torch.eye(N, dtype=torch.float64)
    for layer in range(n):
        if layer < start:
            continue
        grad = torch.autograd.grad(y, [probs[layer]], retain_graph=True)[0]
        cam = probs[layer].detach()
        abar = (grad * cam).clamp(min=0).mean(dim=1)[0].double()  # [N, N]
        R = R + abar @ R
    if tower == "text":
        return R[int(token_row.argmax())].float()  # [L]
    return R[0, 1:].float()  # [N-1]


def reference_all(backbone, images, tokens, tower, start_layer, score="logit"):
    out = torch.zeros(images.shape[0], tokens.shape[0],
                      tokens.shape[1] if tower == "text" else patch_grid(backbone)[0] * patch_grid(backbone)[1])
    for b in range(images.shape[0]):
        for c in range(tokens.shape[0]):
            out[b, c] = reference_pair(backbone, images[b], tokens[c], tower, start_layer, score)
    return out


@pytest.fixture(scope="module")
def tiny():
    from xclip.models.clip_backbone import build_clip

    torch.manual_seed(0)
    return build_clip("tiny-vit-test").freeze()


@pytest.fixture(scope="module")
def inputs(tiny):
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32), tiny.tokenize(TEXTS)


# ------------------------------------------------------------------------------------------ capture
def test_capture_matches_stock_forward_and_restores(tiny, inputs):
    images, tokens = inputs
    with torch.no_grad():
        ref_t, ref_i = tiny.encode_text(tokens), tiny.encode_image(images)
        with capture_attention(tiny, ("text", "visual")) as store:
            t, i = tiny.encode_text(tokens), tiny.encode_image(images)
    assert (t - ref_t).abs().max() < 1e-5 and (i - ref_i).abs().max() < 1e-5
    assert [p.shape for p in store["text"]] == [torch.Size([3, 2, 32, 32])] * 2
    assert [p.shape for p in store["visual"]] == [torch.Size([2, 2, 17, 17])] * 2
    causal = store["text"][0][0, 0]
    assert torch.all(causal.triu(1) == 0) and torch.allclose(causal.sum(-1), torch.ones(32))
    blocks = list(tiny.model.transformer.resblocks) + list(tiny.model.visual.transformer.resblocks)
    assert all("attention" not in vars(b) for b in blocks)  # stock method back


def test_capture_restores_after_error(tiny):
    with pytest.raises(ZeroDivisionError):
        with capture_attention(tiny, "text"):
            1 / 0
    assert all("attention" not in vars(b) for b in tiny.model.transformer.resblocks)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("start_layer", [0, 1, -1])
def test_text_relevance_matches_per_pair(tiny, inputs, start_layer):
    images, tokens = inputs
    got = text_relevance(tiny, images, tokens, start_layer=start_layer, chunk_size=2)
    ref = reference_all(tiny, images, tokens, "text", start_layer)
    assert got.shape == (2, 3, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    eot = tokens.argmax(-1)
    assert torch.all(got[0, 0, eot[0] + 1:] == 0)


@pytest.mark.parametrize("start_layer", [0, -1])
def test_image_relevance_matches_per_pair(tiny, inputs, start_layer):
    images, tokens = inputs
    got = image_relevance(tiny, images, tokens, start_layer=start_layer)
    ref = reference_all(tiny, images, tokens, "visual", start_layer)
    assert got.shape == (2, 3, 16) and patch_grid(tiny) == (4, 4)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start_text,start_image", [(0, -1), (-1, -1), (1, 0), (0, 1)])
@pytest.mark.parametrize("n_images,n_texts", [(1, 1), (2, 3), (1, 3)])
def test_joint_relevance_matches_per_pair_and_separate_calls(tiny, inputs, start_text, start_image, n_images,
                                                            n_texts):
    """One forward per tower + batched backward == the plain per-pair rule == the separate views, every shape."""
    images, tokens = inputs[0][:n_images], inputs[1][:n_texts]
    out = relevance(tiny, images, tokens, start_layer_text=start_text, start_layer_image=start_image)
    ref_t = reference_all(tiny, images, tokens, "text", start_text)
    ref_i = reference_all(tiny, images, tokens, "visual", start_image)
    torch.testing.assert_close(out.text, ref_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image, ref_i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text, text_relevance(tiny, images, tokens, start_layer=start_text),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.image, image_relevance(tiny, images, tokens, start_layer=start_image),
                               atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        sims = tiny.model.logit_scale.exp() * F.normalize(tiny.encode_image(images), dim=-1) \
            @ F.normalize(tiny.encode_text(tokens), dim=-1).T
    torch.testing.assert_close(out.similarity, sims, atol=1e-5, rtol=1e-5)
    assert not out.text.requires_grad and not out.image.requires_grad


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_joint_relevance_chunking_and_text_features_view(tiny, inputs, chunk_size):
    """Chunked texts and sub-batched backward passes (chunk_size=1: one pass per call) give the same maps."""
    images, tokens = inputs
    ref = relevance(tiny, images, tokens, start_layer_image=0, chunk_size=256)
    out = relevance(tiny, images, tokens, start_layer_image=0, chunk_size=chunk_size)
    torch.testing.assert_close(out.text, ref.text, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.image, ref.image, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        feats = tiny.encode_text(tokens)
    via_feats = image_relevance(tiny, images, text_features=feats, start_layer=0, chunk_size=chunk_size)
    torch.testing.assert_close(via_feats, ref.image, atol=1e-5, rtol=1e-5)


def test_depth_limited_backward_keeps_only_needed_layers(tiny, inputs, monkeypatch):
    """start_layer=-1: only the last block's probabilities are kept (the CLS / EOT row only) and the blocks below
    run without a graph; with pixels that need grad the whole graph is kept (gradients must reach them)."""
    import xclip.models.relevance as rel_mod

    images, tokens = inputs
    seen = []
    real = rel_mod._rollout_batched

    def spy(probs, grads, rows, pooled_last):
        seen.append([tuple(p.shape) for p in probs])
        return real(probs, grads, rows, pooled_last)

    def spy_frozen(saved, top, **kw):  # the image maps of several texts: the hand-written backward
        seen.append([tuple(s.probs.shape) for s in saved])
        return real_frozen(saved, top, **kw)

    real_frozen = rel_mod._frozen_rollout
    monkeypatch.setattr(rel_mod, "_rollout_batched", spy)
    monkeypatch.setattr(rel_mod, "_frozen_rollout", spy_frozen)
    graph_below = []
    hook = tiny.model.visual.transformer.resblocks[0].register_forward_hook(
        lambda mod, args, out: graph_below.append(out.requires_grad))
    try:
        relevance(tiny, images, tokens, start_layer_text=-1, start_layer_image=-1)
        eot_max = int(tokens.argmax(-1).max())
        assert seen == [[(3, 2, 1, eot_max + 1)], [(2, 2, 1, 17)]]  # one layer each, pooled row only
        assert graph_below == [False]  # block 0 of the image tower ran without a graph
        x = images.clone().requires_grad_(True)
        r = image_relevance(tiny, x, tokens, start_layer=-1, create_graph=True)
        assert graph_below[-1] is True  # pixels need grad: full graph
    finally:
        hook.remove()
    (g,) = torch.autograd.grad(r.sum(), [x])
    assert g.abs().sum() > 0
    torch.testing.assert_close(r.detach(), reference_all(tiny, images, tokens, "visual", -1), atol=1e-5, rtol=1e-5)


def test_joint_relevance_create_graph_matches_views(tiny64):
    tokens = tiny64.tokenize(TEXTS[:2])
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    out = relevance(tiny64, x, tokens, start_layer_image=0, create_graph=True)
    assert out.text.requires_grad and out.image.requires_grad
    (g_joint,) = torch.autograd.grad(out.text.sum() + out.image.sum(), [x])
    t = text_relevance(tiny64, x, tokens, create_graph=True)
    i = image_relevance(tiny64, x, tokens, start_layer=0, create_graph=True)
    (g_sep,) = torch.autograd.grad(t.sum() + i.sum(), [x])
    torch.testing.assert_close(g_joint, g_sep, atol=1e-9, rtol=1e-7)


def test_joint_relevance_bad_arguments(tiny, inputs):
    images, tokens = inputs
    with pytest.raises(RelevanceError, match="towers"):
        relevance(tiny, images, tokens, towers=("audio",))
    with pytest.raises(RelevanceError, match="exactly one of tokens"):
        relevance(tiny, images)
    with pytest.raises(RelevanceError, match="Image relevance needs images"):
        relevance(tiny, tokens=tokens, image_features=torch.randn(2, 32))
    with pytest.raises(RelevanceError, match="start_layer"):
        relevance(tiny, images, tokens, start_layer_image=7)


def test_cosine_score_differs_from_logit(tiny, inputs):
    images, tokens = inputs
    cos = text_relevance(tiny, images, tokens, score="cosine")
    torch.testing.assert_close(cos, reference_all(tiny, images, tokens, "text", 0, "cosine"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cos, text_relevance(tiny, images, tokens))
    with pytest.raises(RelevanceError, match="score"):
        text_relevance(tiny, images, tokens, score="prob")


@pytest.mark.slow
def test_vit_b32_parity():
    from xclip.models.clip_backbone import build_clip

    torch.manual_seed(0)
    bb = build_clip("ViT-B-32").freeze()
    images = torch.randn(2, 3, 224, 224)
    tokens = bb.tokenize(["a photo of a dog.", "a diagram"])
    with torch.no_grad():
        ref_t, ref_i = bb.encode_text(tokens), bb.encode_image(images)
        with capture_attention(bb) as store:
            t, i = bb.encode_text(tokens), bb.encode_image(images)
    assert (t - ref_t).abs().max() < 1e-5 and (i - ref_i).abs().max() < 1e-5
    assert len(store["text"]) == 12 and store["visual"][0].shape == (2, 12, 50, 50)
    for start in (0, -1):
        torch.testing.assert_close(text_relevance(bb, images, tokens, start_layer=start),
                                   reference_all(bb, images, tokens, "text", start), atol=1e-5, rtol=1e-4)
    for start in (-1, 6):
        got = image_relevance(bb, images, tokens, start_layer=start)
        assert got.reshape(2, 2, *patch_grid(bb)).shape == (2, 2, 7, 7)
        torch.testing.assert_close(got, reference_all(bb, images, tokens, "visual", start), atol=1e-5, rtol=1e-4)
    joint = relevance(bb, images[:1], tokens[:1], start_layer_text=0, start_layer_image=-1)  # one pair, one backward
    torch.testing.assert_close(joint.text, reference_all(bb, images[:1], tokens[:1], "text", 0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(joint.image, reference_all(bb, images[:1], tokens[:1], "visual", -1), atol=1e-5,
                               rtol=1e-4)


# ------------------------------------------------------------------------------------------ embeddings entry
def test_embeddings_entry_equals_token_entry(tiny, inputs):
    images, tokens = inputs
    model = tiny.model
    emb = model.token_embedding(tokens)  # [C, L, W]
    eot = text_eot_index(tiny, tokens)
    with torch.no_grad():
        torch.testing.assert_close(encode_text_from_embeddings(tiny, emb, eot), model.encode_text(tokens),
                                   atol=1e-6, rtol=1e-5)
        img = F.normalize(model.encode_image(images), dim=-1)
    rel, feats = text_relevance_from_embeddings(tiny, img, emb, eot, start_layer=0)
    torch.testing.assert_close(rel, text_relevance(tiny, images, tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.detach(), model.encode_text(tokens).detach(), atol=1e-5, rtol=1e-4)


def test_create_graph_false_keeps_attention_attached(tiny, inputs):
    """CoOp behaviour: a loss on the relevance reaches learned embeddings through A (G constant)."""
    images, tokens = inputs
    emb = tiny.model.token_embedding(tokens).detach().requires_grad_(True)
    with torch.no_grad():
        img = F.normalize(tiny.model.encode_image(images), dim=-1)
    rel, feats = text_relevance_from_embeddings(tiny, img, emb, tokens.argmax(-1))
    assert rel.requires_grad and feats.requires_grad
    (g,) = torch.autograd.grad(rel[:, :, 2].sum(), [emb])
    assert g.abs().sum() > 0


def _directional_check(fn, x: torch.Tensor, n_dirs: int = 2, eps: float = 1e-6) -> None:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), [x])
    gen = torch.Generator().manual_seed(3)
    for _ in range(n_dirs):
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        with torch.enable_grad():
            fd = (fn(x.detach() + eps * v) - fn(x.detach() - eps * v)) / (2 * eps)
        an = (g * v).sum()
        assert torch.allclose(an, fd.detach(), rtol=1e-4, atol=1e-8), (an.item(), fd.item())


@pytest.fixture(scope="module")
def tiny64():
    from xclip.models.clip_backbone import build_clip

    torch.manual_seed(0)
    return build_clip("tiny-vit-test").freeze().double()


def test_create_graph_pixel_gradients_match_finite_differences(tiny64):
    tokens = tiny64.tokenize(TEXTS[:2])
    torch.manual_seed(2)
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    w_t = torch.rand(1, 2, 32, dtype=torch.float64)
    w_i = torch.rand(1, 2, 16, dtype=torch.float64)
    _directional_check(lambda x: (w_t * text_relevance(tiny64, x, tokens, create_graph=True)).sum(), images)
    _directional_check(lambda x: (w_i * image_relevance(tiny64, x, tokens, start_layer=0, create_graph=True)).sum(),
                       images)


def test_create_graph_embedding_gradients_match_finite_differences(tiny64):
    tokens = tiny64.tokenize(TEXTS[:2])
    emb0 = tiny64.model.token_embedding(tokens).detach()
    torch.manual_seed(4)
    img = F.normalize(torch.randn(2, 64, dtype=torch.float64), dim=-1)
    w = torch.rand(2, 2, 32, dtype=torch.float64)

    def loss(e):
        rel, _ = text_relevance_from_embeddings(tiny64, img, e, tokens.argmax(-1), create_graph=True)
        return (w * rel).sum()

    _directional_check(loss, emb0)


def test_create_graph_false_gradient_is_first_order_path(tiny64):
    """create_graph=False: d loss / d embeds equals the finite difference with G frozen at its current value."""
    from xclip.models.relevance import rollout_row

    model = tiny64.model
    tokens = tiny64.tokenize(TEXTS[:2])
    eot = tokens.argmax(-1)
    emb0 = model.token_embedding(tokens).detach()
    torch.manual_seed(5)
    img = F.normalize(torch.randn(1, 64, dtype=torch.float64), dim=-1)
    w = torch.rand(1, 2, 32, dtype=torch.float64)

    def forward(e):
        with capture_attention(model, "text") as store:
            t = F.normalize(encode_text_from_embeddings(model, e, eot), dim=-1)
        return store["text"], model.logit_scale.exp() * (img @ t.T)[0].sum()

    probs0, y0 = forward(emb0.clone().requires_grad_(True))
    g0 = [g.detach() for g in torch.autograd.grad(y0, probs0)]

    def frozen_g_loss(e):
        probs, _ = forward(e)
        return (w[0] * rollout_row(probs, g0, eot)).sum()

    e = emb0.clone().requires_grad_(True)
    rel, _ = text_relevance_from_embeddings(tiny64, img, e, eot, create_graph=False)
    (g_engine,) = torch.autograd.grad((w * rel).sum(), [e])
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        v = torch.randn(emb0.shape, generator=gen, dtype=torch.float64)
        fd = (frozen_g_loss(emb0 + 1e-6 * v) - frozen_g_loss(emb0 - 1e-6 * v)) / 2e-6
        assert torch.allclose((g_engine * v).sum(), fd.detach(), rtol=1e-4)


# ------------------------------------------------------------------------------------------ words
def test_word_spans_and_scores(tiny):
    tok = tiny.tokenizer
    text = "A person with purple hair."
    tokens = tiny.tokenize(text)[0]
    spans = word_token_spans(tok, text, tokens)
    assert [s.word for s in spans] == text.split()
    assert spans[0].start == 1 and spans[-1].end == int(tokens.argmax())  # words cover SOS+1 .. EOT-1
    assert spans[-1].end - spans[-1].start == 2  # "hair." -> hair, .
    rel = torch.rand(3, 32)
    scores, _ = word_relevance(rel, tokens, tok, text, normalise="none", reduce="max")
    assert scores.shape == (3, 5)
    torch.testing.assert_close(scores[:, 4], rel[:, spans[4].start:spans[4].end].amax(-1))
    mask = words_token_mask(tok, text, ["purple", 4], 32)
    assert mask.sum() == 1 + 2 and mask[spans[3].start]


def test_word_relevance_batched_texts(tiny, inputs):
    images, tokens = inputs
    rel = text_relevance(tiny, images, tokens)
    out = word_relevance(rel, tokens, tiny.tokenizer, TEXTS, normalise="fusedream")
    assert len(out) == 3 and out[0][0].shape == (2, 5)
    assert torch.all(out[0][0] <= 1 + 1e-6)


class _MergingTokenizer:
    """A BPE stand-in that merges across spaces ("new york" is one token), so per-word encodings do not add up."""

    vocab = {"new york": 7, "new": 1, "york": 2, "city": 3}

    def encode(self, text: str) -> list[int]:
        text = text.replace("new york", "NY_")
        return [7 if w == "NY_" else self.vocab[w] for w in text.split()]


def test_word_alignment_error_is_clear(tiny):
    with pytest.raises(RelevanceError, match="Cannot align word 'new'"):
        word_token_spans(_MergingTokenizer(), "new york city")
    assert [s.start for s in word_token_spans(_MergingTokenizer(), "city new")] == [1, 2]
    with pytest.raises(RelevanceError, match="do not encode"):  # tokens of another text
        word_token_spans(tiny.tokenizer, "a red square", tiny.tokenize("a blue circle")[0])


def test_normalisations():
    rel = torch.tensor([[4.0, 1.0, 2.0, 1.0, 5.0, 0.0]])  # SOS, w1, w2, w3, EOT, pad
    eot = torch.tensor([4])
    torch.testing.assert_close(normalise_token_relevance(rel, eot, "coop"),
                               torch.tensor([[4.0, 1.0, 2.0, 1.0, 0.0, 0.0]]) / 8)
    torch.testing.assert_close(normalise_token_relevance(rel, eot, "styleclip"),
                               torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0, 0.0]]) / 4)
    torch.testing.assert_close(normalise_token_relevance(rel, eot, "fusedream"),
                               torch.tensor([[0.0, 0.5, 1.0, 0.5, 0.0, 0.0]]))
    with pytest.raises(RelevanceError, match="Unknown normalisation"):
        normalise_token_relevance(rel, eot, "bogus")


# ------------------------------------------------------------------------------------------ errors
def test_unsupported_block_error_names_type():
    cfg = dict(embed_dim=32, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                         "patch_size": 16, "qk_norm": True},
               text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    model = open_clip.CLIP(**cfg).eval()
    with pytest.raises(RelevanceError, match="CustomResidualAttentionBlock"):
        with capture_attention(model, ("text", "visual")):
            pass
    assert all("attention" not in vars(b) for b in model.transformer.resblocks)  # nothing left patched


def test_resnet_visual_tower_error_but_text_relevance_works():
    cfg = dict(embed_dim=32, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
               text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    model = open_clip.CLIP(**cfg).eval()
    tokens = open_clip.get_tokenizer("RN50")(["a dog"], context_length=16)
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(RelevanceError, match="ModifiedResNet"):
        image_relevance(model, images, tokens)
    assert text_relevance(model, images, tokens).shape == (1, 1, 16)


def test_bad_inputs(tiny, inputs):
    images, tokens = inputs
    with pytest.raises(RelevanceError, match="start_layer"):
        text_relevance(tiny, images, tokens, start_layer=5)
    with pytest.raises(RelevanceError, match=r"tokens must be \[C, L\]"):
        text_relevance(tiny, images, tokens[0])
    with pytest.raises(RelevanceError, match="eot_index"):
        encode_text_from_embeddings(tiny, tiny.model.token_embedding(tokens), torch.tensor([40, 1, 2]))


# ------------------------------------------------------------------------------------------ viz
def test_viz_returns_pil_images(tiny, inputs):
    from PIL import Image

    from xclip.models.relevance_viz import overlay_relevance, token_heat_strip, token_strings

    images, tokens = inputs
    rel = image_relevance(tiny, images, tokens)  # [2, 3, 16]
    over = overlay_relevance(torch.rand(3, 32, 32), rel[0, 0])
    assert isinstance(over, Image.Image) and over.size == (32, 32) and over.mode == "RGB"
    t_rel = text_relevance(tiny, images, tokens)[0, 0]
    pieces = token_strings(tokens[0], tiny.tokenizer)
    assert pieces[0] == "<sos>" and pieces[-1] == "<eot>" and "dog" in pieces
    strip = token_heat_strip(pieces, t_rel[: len(pieces)])
    assert isinstance(strip, Image.Image) and strip.size[0] >= 36 * len(pieces)
    with pytest.raises(ValueError, match="square"):
        overlay_relevance(torch.rand(3, 32, 32), torch.rand(15))


# ------------------------------------------------------------------------------------------ engine kernels
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 50])
@pytest.mark.parametrize("with_bias", [True, False])
def test_engine_linear_equals_f_linear(rows, with_bias):
    """_linear runs oneDNN without a graph and F.linear with one: same values (and gradients) as F.linear."""
    from xclip.models.relevance import _linear

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 24, generator=g)
    w, b = torch.randn(40, 24, generator=g), (torch.randn(40, generator=g) if with_bias else None)
    ref = F.linear(x, w, b)
    with torch.no_grad():
        torch.testing.assert_close(_linear(x, w, b), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_linear(x.double(), w.double(), None if b is None else b.double()), ref.double(),
                               atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    out = _linear(xg, w, b)
    assert out.requires_grad and out.shape == ref.shape
    cot = torch.randn(3, *ref.shape, generator=g)
    got = torch.autograd.grad(out, xg, cot, is_grads_batched=True)[0]
    torch.testing.assert_close(got, cot @ w, atol=1e-5, rtol=1e-5)


def test_patchify_matmul_equals_conv():
    from xclip.models.relevance import _is_patchify, _patchify_forward

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=True)
    x = torch.randn(2, 3, 18, 22, generator=g)  # not a multiple of the patch: the remainder is dropped, as by conv
    assert _is_patchify(conv)
    torch.testing.assert_close(_patchify_forward(conv, x), conv(x), atol=1e-5, rtol=1e-5)
    assert not _is_patchify(torch.nn.Conv2d(3, 8, kernel_size=4, stride=2))
    assert not _is_patchify(torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, padding=1))


@pytest.mark.parametrize("tower", ["text", "visual"])
def test_fused_skip_block_equals_stock_block(tiny, tower):
    """The blocks below the start layer run fused attention (SDPA) and the engine linears: = the stock block."""
    from xclip.models.relevance import _block_tail, _engine_attention

    model = tiny.model
    blk = (model.transformer if tower == "text" else model.visual.transformer).resblocks[0]
    x = torch.randn(2, 7, blk.attn.embed_dim, generator=torch.Generator().manual_seed(1))
    masks = [None]
    if tower == "text":
        masks += [model.attn_mask[:7, :7], torch.ones(7, 7, dtype=torch.bool).triu(1)]  # additive and boolean
    with torch.no_grad():
        for mask in masks:
            # a boolean mask means "True = may not attend" (nn.MultiheadAttention); the stock block would cast it
            # to 0/1 floats, so its reference is the equivalent additive mask
            additive = mask if mask is None or mask.dtype != torch.bool \
                else torch.zeros(mask.shape).masked_fill(mask, float("-inf"))
            ref = blk(x, attn_mask=additive)
            got = _block_tail(blk, x, _engine_attention(blk, None, blk.ln_1(x), mask, True))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            keep: list = []
            got = _block_tail(blk, x, _engine_attention(blk, keep, blk.ln_1(x), mask, False))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert len(keep) == 1 and keep[0].shape == (2, blk.attn.num_heads, 7, 7)


@pytest.mark.parametrize("quick", [False, True])
def test_first_order_gelu_equals_stock_activation(quick):
    from open_clip.transformer import QuickGELU

    from xclip.models.relevance import _activation

    act = QuickGELU() if quick else torch.nn.GELU()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = _activation(act, x, first_order=True)
    assert y.grad_fn is not None and "FirstOrderGelu" in type(y.grad_fn).__name__
    ref = act(x)
    torch.testing.assert_close(y, ref)
    cot = torch.randn(3, 4, 6, dtype=torch.float64)
    got = torch.autograd.grad(y, x, cot, is_grads_batched=True, retain_graph=True)[0]
    torch.testing.assert_close(got, torch.autograd.grad(ref, x, cot, is_grads_batched=True)[0])
    with pytest.raises(RuntimeError):  # first order only: a double backward is refused, not silently wrong
        g = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
        torch.autograd.grad(g.sum(), x)
    assert "FirstOrderGelu" not in type(_activation(act, x, first_order=False).grad_fn).__name__


# ------------------------------------------------------------------------------------------ frozen backward
def _deep_clip(dtype: torch.dtype, quick: bool) -> torch.nn.Module:
    """A random open_clip CLIP deeper than tiny-vit-test (4 image / 3 text blocks, so the middle blocks' full
    backward runs), with LayerNorm gammas / betas and biases away from their init and sharper attention, frozen."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(3)
    model = CLIP(32, CLIPVisionCfg(layers=4, width=64, head_width=16, patch_size=8, image_size=32),
                 CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=3), quick_gelu=quick)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
            if isinstance(mod, torch.nn.MultiheadAttention):
                mod.in_proj_weight.mul_(3)
                mod.in_proj_bias.normal_(0, 0.1)
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
    return model.to(dtype).eval().requires_grad_(False)


def _tower_pass_grads(model, tower: str, start: int, recorder, dtype):
    """(features, per-pass explained rows, per-layer dy/dA) of 3 random cotangents on 3 x 4 scores of ``tower``."""
    from xclip.models.relevance import _frozen_rollout, _pass_grads, _relevance_tower, _rollout_batched

    g = torch.Generator().manual_seed(5)
    if tower == "visual":
        x, rows = torch.randn(3, 3, 32, 32, generator=g, dtype=dtype), torch.zeros(3, dtype=torch.long)
    else:
        rows = torch.tensor([5, 9, 2])
        x = model.token_embedding(torch.randint(1, 99, (3, 10), generator=g))  # [3, 10, W]
    targets = torch.randn(4, 32, generator=g, dtype=dtype)
    masks = torch.randn(3, 3, 4, generator=g, dtype=dtype)  # general cotangents, not one-hot columns
    with torch.enable_grad():
        with _relevance_tower(model, tower, start, depth_limit=True, pooled_rows=rows, first_order=True,
                              recorder=recorder) as store:
            feats = model.encode_image(x) if tower == "visual" else encode_text_from_embeddings(model, x, rows)
        sims = F.normalize(feats, dim=-1) @ targets.T  # [3, 4]
        if recorder is None:
            grads = _pass_grads(sims, store[tower], masks, False)  # per layer [k, B, H, n_q, N]
            return feats, _rollout_batched(store[tower], grads, rows, True), grads
        top = _pass_grads(sims, [recorder.leaf], masks, False)[0]  # [k, B, W]
        grads: list = []
        rel = _frozen_rollout(recorder.saved, top, grads_out=grads)
        return feats, rel, grads[::-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("tower,start", [("visual", 0), ("visual", 2), ("visual", -1), ("text", 0), ("text", 1)])
def test_frozen_backward_equals_autograd_per_layer(tower, start, quick, dtype):
    """The hand-written backward of the frozen block stack gives autograd's dy/dA at EVERY layer (so no term of
    the MLP / LayerNorm / softmax / q k v backward can be missing) and the same explained rows; its recording
    forward gives the same features.  Image tower (CLS row) and text tower (causal mask, EOT rows 5, 9, 2)."""
    from xclip.models.relevance import _frozen_tower_ok, _Recorder

    model = _deep_clip(dtype, quick)
    assert _frozen_tower_ok(model, tower, start)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    f_ref, r_ref, g_ref = _tower_pass_grads(model, tower, start, None, dtype)
    rec = _Recorder()
    f_got, r_got, g_got = _tower_pass_grads(model, tower, start, rec, dtype)
    n_layers = len((model.visual.transformer if tower == "visual" else model.transformer).resblocks)
    assert len(g_got) == len(g_ref) == n_layers - (start % n_layers)
    torch.testing.assert_close(f_got, f_ref, atol=tol, rtol=tol)
    for layer, (a, b) in enumerate(zip(g_got, g_ref)):
        assert a.shape == b.shape and b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=tol * float(b.abs().max()), rtol=tol, msg=f"dy/dA of layer {layer}")
    torch.testing.assert_close(r_got, r_ref, atol=tol, rtol=tol)


def test_frozen_backward_is_used_only_where_it_applies(tiny, inputs, monkeypatch):
    """relevance takes the hand-written backward for frozen maps with several passes over a tower (image maps of
    several texts, text maps of several images; equal to the plain per-pair rule there, also in float64), and
    autograd for one pass, create_graph=True, pixels with grad and learned prompt embeddings."""
    import xclip.models.relevance as rel_mod

    images, tokens = inputs
    calls = []
    real = rel_mod._frozen_rollout
    monkeypatch.setattr(rel_mod, "_frozen_rollout", lambda *a, **k: calls.append(1) or real(*a, **k))
    for start in (0, 1):
        got = image_relevance(tiny, images, tokens, start_layer=start)
        assert calls and not got.requires_grad
        torch.testing.assert_close(got, reference_all(tiny, images, tokens, "visual", start), atol=1e-5, rtol=1e-5)
    calls.clear()
    got = text_relevance(tiny, images, tokens, start_layer=0)
    assert calls
    torch.testing.assert_close(got, reference_all(tiny, images, tokens, "text", 0), atol=1e-5, rtol=1e-5)
    calls.clear()
    image_relevance(tiny, images, tokens[:1], start_layer=0)
    image_relevance(tiny, images, tokens, start_layer=0, create_graph=True)
    image_relevance(tiny, images.clone().requires_grad_(True), tokens, start_layer=0)
    text_relevance(tiny, images[:1], tokens, start_layer=0)
    text_relevance(tiny, images, tokens, start_layer=0, create_graph=True)
    with torch.no_grad():
        feats = F.normalize(tiny.encode_image(images), dim=-1)
    embeds = tiny.model.token_embedding(tokens).detach().requires_grad_(True)
    text_relevance_from_embeddings(tiny, feats, embeds, tokens.argmax(-1))
    assert not calls
    model64 = copy.deepcopy(tiny).double()  # a copy: the fixture's model stays float32
    got = image_relevance(model64, images.double(), tokens, start_layer=0)
    assert calls and got.dtype == torch.float64
    torch.testing.assert_close(got.float(), reference_all(tiny, images, tokens, "visual", 0), atol=1e-5, rtol=1e-5)
