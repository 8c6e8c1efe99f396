"""ZeroCap: beam search mechanics, the CLIP target, arithmetic, and that CLIP guidance raises CLIP similarity."""
import random

import pytest
import torch
import torch.nn.functional as F

from xclip.datamodules.synthetic_world import COLOURS, SHAPES, render_object, to_tensor
from xclip.generation.zerocap import ZeroCap, ZeroCapConfig, forbidden_token_ids
from xclip.models.clip_backbone import SHIPPED_WEIGHTS, build_clip


@pytest.fixture(scope="module")
def tiny_lm():
    """A byte-level BPE tokenizer + 2-layer GPT-2 trained for a few seconds on world captions (all local)."""
    from _tiny_lm import world_lm

    return world_lm()


@pytest.fixture(scope="module")
def world_clip():
    if not SHIPPED_WEIGHTS[("tiny-vit-world", "synthetic-world")].is_file():
        pytest.skip("needs the shipped tiny CLIP (checkpoints/tiny_clip_world.pt)")
    return build_clip("tiny-vit-world", "synthetic-world")


def _images(clip, n, seed=3):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img, _ = render_object(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng, image_size=clip.image_size)
        out.append(to_tensor(img))
    return torch.stack(out)


def test_forbidden_ids_cover_digits_and_punctuation(tiny_lm):
    _, tok = tiny_lm
    banned = {tok.decode([i]).strip() for i in forbidden_token_ids(tok)}
    assert {"1", "2", "3", "(", ")", ",", ":", "!"} <= banned
    assert "." not in banned and "a" not in banned


def test_clip_target_is_a_distribution_on_top_k(tiny_lm, tiny_backbone):
    lm, tok = tiny_lm
    zc = ZeroCap(tiny_backbone, lm, tok, ZeroCapConfig(top_size=16))
    probs = F.softmax(torch.randn(3, len(tok)), -1)
    target = F.normalize(torch.randn(tiny_backbone.embed_dim), dim=0)
    q = zc.clip_target(probs, ["Image of a", "Image of a red", "x"], target)
    assert torch.allclose(q.sum(-1), torch.ones(3), atol=1e-5)
    assert ((q > 0).sum(-1) <= 16).all()
    top = probs.topk(16, -1).indices
    assert torch.equal(q.gather(1, top).gt(0).sum(-1), (q > 0).sum(-1))


def test_zero_iterations_is_plain_beam_search(tiny_lm, tiny_backbone):
    """With 0 iterations and fusion, the result is the LM's own beam search under the same logit edits."""
    lm, tok = tiny_lm
    cfg = ZeroCapConfig(num_iterations=0, beam_size=3, target_seq_length=6, normalize_over_beams=False)
    zc = ZeroCap(tiny_backbone, lm, tok, cfg)
    target = F.normalize(torch.randn(tiny_backbone.embed_dim), dim=0)
    beams = zc.beam_search(target)
    # reference: greedy-by-average beam search written plainly on the LM's edited distribution
    ctx = zc.context_tokens()
    with torch.no_grad():
        logp0 = F.log_softmax(zc.edit_logits(lm(ctx).logits[:, -1], ctx, 0), -1)[0]
    assert beams[0].tokens[0] in logp0.topk(3).indices.tolist()
    assert all(len(b.tokens) <= 6 for b in beams)
    assert [b.lm_score for b in beams] == sorted([b.lm_score for b in beams], reverse=True)


def test_arithmetic_target(tiny_backbone):
    zc = ZeroCap.__new__(ZeroCap)
    torch.nn.Module.__init__(zc)
    zc.clip = tiny_backbone
    imgs = tiny_backbone.normalize_pixels(torch.rand(3, 3, 32, 32))
    raw_i = tiny_backbone.encode_image(imgs, normalize=False)
    raw_t = tiny_backbone.encode_text(tiny_backbone.tokenize(["a king"]), normalize=False)
    v = zc.arithmetic_target(imgs, [1, 1, -1], ["a king"], [0.5])
    expected = F.normalize(raw_i[0] + raw_i[1] - raw_i[2] + 0.5 * raw_t[0], dim=0)
    assert torch.allclose(v, expected, atol=1e-5)
    with pytest.raises(ValueError, match="3 images but 2 image weights"):
        zc.arithmetic_target(imgs, [1, 1])


def test_guidance_raises_clip_similarity(tiny_lm, world_clip):
    """Same LM, seed and length: CLIP-guided captions match their images better than unguided beam search.

    The step size is 1.0 rather than the anchor's 0.3: the 2-layer LM's keys/values have another scale than
    gpt2-medium's (at 0.3 the shift hardly moves this LM), and 20 shift iterations instead of 5: this 60-step LM
    moves slowly, and with the reading world CLIP (issue 18) 5 / 10 iterations gave guided CLIP-S 0.16 / 0.19 against
    0.17 unguided, 20 give 0.33.
    """
    lm, tok = tiny_lm
    images = _images(world_clip, 6)
    kw = dict(beam_size=3, target_seq_length=4, top_size=64, stepsize=1.0, num_iterations=20)
    guided = ZeroCap(world_clip, lm, tok, ZeroCapConfig(**kw))
    plain = ZeroCap(world_clip, lm, tok, ZeroCapConfig(**{**kw, "num_iterations": 0}))
    s_guided, s_plain = [], []
    for img in images:
        target = guided.image_target(img[None])
        torch.manual_seed(0)
        s_guided.append(guided.caption(target)[0].text)
        torch.manual_seed(0)
        s_plain.append(plain.caption(target)[0].text)
    with torch.no_grad():
        fi = world_clip.encode_image(images)
        cos_g = (fi * world_clip.encode_text(world_clip.tokenize([f"Image of a{t}" for t in s_guided]))).sum(-1)
        cos_p = (fi * world_clip.encode_text(world_clip.tokenize([f"Image of a{t}" for t in s_plain]))).sum(-1)
    assert cos_g.mean() > cos_p.mean() + 0.05, (s_guided, s_plain, cos_g.tolist(), cos_p.tolist())


def test_context_shift_moves_the_lm_towards_clips_target(tiny_lm, tiny_backbone):
    """The mechanism: a few normalised gradient steps on the cached keys/values lower CE(q_clip, p_shifted)."""
    import torch.nn.functional as F

    lm, tok = tiny_lm
    zc = ZeroCap(tiny_backbone, lm, tok, ZeroCapConfig(top_size=64, stepsize=0.3, num_iterations=5))
    img = torch.randn(1, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=torch.Generator().manual_seed(0))
    target = zc.image_target(img)
    ctx = zc.context_tokens()
    with torch.no_grad():
        p = F.softmax(lm(input_ids=ctx).logits[:, -1].float(), dim=-1)      # [1, V] unshifted
    q = zc.clip_target(p, [zc._prefix_text(ctx[0])], target)                 # CLIP's target on the top-k
    ce_plain = -(q * p.clamp_min(1e-30).log()).sum().item()
    zc.cfg.fusion_factor = 1.0                                              # look at the shifted LM alone
    zc.cfg.end_factor = zc.cfg.start_factor = zc.cfg.forbidden_factor = zc.cfg.repetition_penalty = 1.0
    log_shift = zc.next_log_probs(ctx, 1, target)                           # normalised over the single beam
    ce_shift = -(q * log_shift).sum().item()
    assert ce_shift < ce_plain - 0.05, (ce_plain, ce_shift)


def test_cli_captions_a_folder_with_references(tiny_lm, tmp_path):
    import json

    from xclip.generation.zerocap import main

    lm, tok = tiny_lm
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rng = random.Random(0)
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        render_object("star", "red", rng, image_size=32)[0].save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "refs.json").write_text(json.dumps({"0.png": ["Image of a red star."], "1.png": ["a red star."]}))
    out = main(["--images", str(tmp_path / "imgs"), "--lm", str(tmp_path / "lm"), "--backbone", "tiny-vit-test",
                "--pretrained", "none", "--beam_size", "2", "--target_seq_length", "3", "--top_size", "8",
                "--num_iterations", "1", "--references", str(tmp_path / "refs.json"),
                "--out", str(tmp_path / "caps.json"), "--device", "cpu"])
    saved = json.loads((tmp_path / "caps.json").read_text(), parse_constant=pytest.fail)
    assert saved["complete"] is True
    assert len(saved["captions"]) == 2 and all(c["caption"].startswith("Image of a") for c in saved["captions"])
    assert 0.0 <= saved["reference_metrics"]["bleu1"] <= 1.0
    assert out["timing_s"]["clip"] > 0 and out["timing_s"]["lm"] > 0


def test_missing_lm_offline_is_a_clear_error(tmp_path):
    from xclip.generation.zerocap import load_language_model

    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_language_model(str(tmp_path / "no_such_lm"))
