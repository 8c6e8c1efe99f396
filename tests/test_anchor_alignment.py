"""Issue 17 §5: options that reproduce the anchors where the project's default differs (StyleCLIP global
directions' uint8 + PIL preprocessing, the paper's signed disentangling losses, CoOp's fp16)."""
import numpy as np
import pytest
import torch
from PIL import Image

from xclip.losses.contrastive import PAIRS, PRESETS, resolve_weights


def test_anchor_preprocessing_is_uint8_pil_bicubic(tiny_backbone):
    from xclip.generation.global_directions import clip_standard_input

    torch.manual_seed(0)
    imgs = torch.rand(3, 3, 64, 64) * 2.2 - 1.1  # a generator's output, a little outside [-1, 1]
    ours = clip_standard_input(tiny_backbone, imgs, "anchor")
    S = tiny_backbone.image_size
    ref = []
    for x in imgs:  # written from the anchor's steps: uint8 export, PIL bicubic to S (square: no crop), /255
        a = np.clip(np.rint((x.clamp(-1, 1).numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        im = Image.fromarray(a).resize((S, S), Image.BICUBIC)
        ref.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1))
    ref = tiny_backbone.normalize_pixels(torch.stack(ref))
    assert (ours - ref).abs().max() < 1e-5
    default = clip_standard_input(tiny_backbone, imgs)
    assert 0 < (default - ours).abs().mean() < 0.1  # close, not identical: the documented 1-2 % difference
    with pytest.raises(ValueError, match="preprocess='pil'"):
        clip_standard_input(tiny_backbone, imgs, "pil")


def test_global_directions_anchor_preprocess_has_its_own_cache(tiny_backbone, tmp_path):
    from xclip.generation import global_directions as gd
    from xclip.models.stylegan2 import build_generator

    gen = build_generator(None, size=32, style_dim=64, n_mlp=2, channel_multiplier=2, channel_max=16)
    stats = gd.style_statistics(gen, n_samples=32, n_codes=2, batch_size=32, progress=False)
    a, _ = gd.channel_relevance(gen, tiny_backbone, stats, layers=[0], n_images=2, cache_dir=tmp_path, progress=False)
    b, _ = gd.channel_relevance(gen, tiny_backbone, stats, layers=[0], n_images=2, cache_dir=tmp_path, progress=False,
                                preprocess="anchor")
    assert len(list(tmp_path.glob("fs3_*.pt"))) == 2 and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b).mean() > 0.5


def test_signed_presets_are_the_papers_forms():
    signs = {"learn_to_spell_signed": {"L1": -1, "L2": -1, "L6": -1, "L3": 1, "L4": 1, "L5": 1},
             "forget_to_spell_signed": {"L1": 1, "L2": 1, "L6": 1, "L3": -1, "L4": -1, "L5": -1},
             "learn_to_spell_signed_ablation": {"L1": -1, "L3": 1, "L4": 1, "L5": 1, "L2": 0, "L6": 0},
             "forget_to_spell_signed_ablation": {"L1": 1, "L2": 1, "L5": -1, "L6": 1, "L3": 0, "L4": 0}}
    for name, want in signs.items():
        assert resolve_weights(name) == {k: float(want.get(k, 0)) for k in PAIRS}
    # the unsigned subsets are unchanged
    assert PRESETS["forget_to_spell"] == {"L1": 1.0, "L2": 1.0, "L6": 1.0}
    assert PRESETS["learn_to_spell"] == {"L3": 1.0, "L4": 1.0, "L5": 1.0}


def test_signed_preset_trains_through_the_module():
    from xclip.lightning_modules.spelling import SpellingProjection

    m = SpellingProjection("tiny-vit-test", None, k=8, preset="forget_to_spell_signed")
    assert m.loss_weights["L3"] == -1.0 and m.hparams.k == 8


def test_coop_runs_in_anchor_fp16(tmp_path):
    """CoOp's PREC=fp16 (the whole CLIP and the context in half) is trainer.precision=16-true here."""
    import pytorch_lightning as pl

    from xclip.lightning_modules.coop import CoOp

    m = CoOp("tiny-vit-test", None, classnames=["a", "b"], n_ctx=2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_steps=2, accelerator="cpu",
                         precision="16-true", enable_progress_bar=False, enable_model_summary=False)
    before = m.prompt_learner.ctx.detach().float().clone()
    trainer.fit(m, loader)
    assert m.prompt_learner.ctx.dtype == torch.float16
    assert not torch.equal(m.prompt_learner.ctx.detach().float(), before)
