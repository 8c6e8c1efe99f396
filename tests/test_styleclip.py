"""StyleCLIP: generator (rosinality format), ArcFace (IR-SE50 format), losses, optimisation (+ NTLB word
loss), global directions and the `xclip generate` CLI, on tiny random models."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from xclip.models.stylegan2 import (
    Generator,
    GeneratorCheckpointError,
    build_generator,
    load_generator,
    load_generator_state,
    make_kernel,
)

TINY = dict(size=32, style_dim=64, n_mlp=2, channel_multiplier=2, channel_max=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops, shared 2-core machine


# ---- expected state-dict layouts, written from the architecture rules (not from our modules) ------------
def rosinality_g_ema_shapes(size, style_dim, n_mlp, channel_multiplier=2, channel_max=512) -> dict[str, tuple]:
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    ch = {r: min(c, channel_max) for r, c in base.items()}
    log_size = int(math.log2(size))
    keys: dict[str, tuple] = {}
    for i in range(1, n_mlp + 1):  # style.0 is PixelNorm
        keys[f"style.{i}.weight"] = (style_dim, style_dim)
        keys[f"style.{i}.bias"] = (style_dim,)
    keys["input.input"] = (1, ch[4], 4, 4)

    def styled(p, cin, cout, up):
        keys[f"{p}.conv.weight"] = (1, cout, cin, 3, 3)
        if up:
            keys[f"{p}.conv.blur.kernel"] = (4, 4)
        keys[f"{p}.conv.modulation.weight"] = (cin, style_dim)
        keys[f"{p}.conv.modulation.bias"] = (cin,)
        keys[f"{p}.noise.weight"] = (1,)
        keys[f"{p}.activate.bias"] = (cout,)

    def rgb(p, cin, up):
        keys[f"{p}.bias"] = (1, 3, 1, 1)
        if up:
            keys[f"{p}.upsample.kernel"] = (4, 4)
        keys[f"{p}.conv.weight"] = (1, 3, cin, 1, 1)
        keys[f"{p}.conv.modulation.weight"] = (cin, style_dim)
        keys[f"{p}.conv.modulation.bias"] = (cin,)

    styled("conv1", ch[4], ch[4], False)
    rgb("to_rgb1", ch[4], False)
    cin = ch[4]
    for k, i in enumerate(range(3, log_size + 1)):
        cout = ch[2 ** i]
        styled(f"convs.{2 * k}", cin, cout, True)
        styled(f"convs.{2 * k + 1}", cout, cout, False)
        rgb(f"to_rgbs.{k}", cout, True)
        cin = cout
    for layer in range(2 * (log_size - 2) + 1):
        r = 2 ** ((layer + 5) // 2)
        keys[f"noises.noise_{layer}"] = (1, 1, r, r)
    return keys


def fake_g_ema(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    fir = make_kernel([1, 3, 3, 1]) * 4
    return {k: fir.clone() if k.endswith("kernel") else torch.randn(s, generator=g) for k, s in shapes.items()}


def irse50_shapes(num_batches_tracked: bool = True) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}

    def bn(p, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{p}.{n}"] = (c,)
        if num_batches_tracked:
            keys[f"{p}.num_batches_tracked"] = ()

    keys["input_layer.0.weight"] = (64, 3, 3, 3)
    bn("input_layer.1", 64)
    keys["input_layer.2.weight"] = (64,)
    i = 0
    for cin, depth, units in [(64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3)]:
        for u in range(units):
            c_in = cin if u == 0 else depth
            p = f"body.{i}"
            if c_in != depth:
                keys[f"{p}.shortcut_layer.0.weight"] = (depth, c_in, 1, 1)
                bn(f"{p}.shortcut_layer.1", depth)
            bn(f"{p}.res_layer.0", c_in)
            keys[f"{p}.res_layer.1.weight"] = (depth, c_in, 3, 3)
            keys[f"{p}.res_layer.2.weight"] = (depth,)
            keys[f"{p}.res_layer.3.weight"] = (depth, depth, 3, 3)
            bn(f"{p}.res_layer.4", depth)
            keys[f"{p}.res_layer.5.fc1.weight"] = (depth // 16, depth, 1, 1)
            keys[f"{p}.res_layer.5.fc2.weight"] = (depth, depth // 16, 1, 1)
            i += 1
    bn("output_layer.0", 512)
    keys["output_layer.3.weight"] = (512, 512 * 7 * 7)
    keys["output_layer.3.bias"] = (512,)
    bn("output_layer.4", 512)
    return keys


# ---- generator ------------------------------------------------------------------------------------------
def test_generator_loads_rosinality_checkpoint_strictly(tmp_path):
    shapes = rosinality_g_ema_shapes(32, 64, 2, channel_max=16)
    state = fake_g_ema(shapes)
    path = tmp_path / "stylegan2-tiny.pt"
    torch.save({"g_ema": state, "latent_avg": torch.randn(64)}, path)
    gen = load_generator(path, size=32)
    assert set(gen.state_dict()) == set(shapes)
    assert all(tuple(v.shape) == shapes[k] for k, v in gen.state_dict().items())
    assert torch.equal(gen.conv1.conv.weight, state["conv1.conv.weight"])
    assert gen.latent_avg.shape == (1, 64)
    img, w = gen([torch.randn(2, 64)], return_latents=True, randomize_noise=False)
    assert img.shape == (2, 3, 32, 32) and w.shape == (2, gen.n_latent, 64) and torch.isfinite(img).all()


def test_generator_checkpoint_of_wrong_resolution_is_rejected(tmp_path):
    path = tmp_path / "g32.pt"
    torch.save({"g_ema": fake_g_ema(rosinality_g_ema_shapes(32, 64, 2, channel_max=16))}, path)
    with pytest.raises(GeneratorCheckpointError, match=r"32 px generator.*size=64"):
        load_generator(path, size=64)
    with pytest.raises(GeneratorCheckpointError, match=r"holds a 32 px generator.*built for 16 px"):
        load_generator_state(Generator(16, 64, 2, channel_max=16), torch.load(path)["g_ema"], str(path))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GeneratorCheckpointError, match="junk.pt"):
        load_generator(tmp_path / "junk.pt")


def test_generator_api_truncation_noise_stylespace():
    from xclip.models.stylegan2 import NoiseInjection

    gen = build_generator(None, **TINY)
    with torch.no_grad():  # fresh noise strengths are 0; make noise visible
        for m in gen.modules():
            if isinstance(m, NoiseInjection):
                m.weight.fill_(0.5)
    z = torch.randn(3, 64)
    mean = gen.mean_latent(256)
    img_a, w = gen([z], return_latents=True, randomize_noise=False, truncation=0.5, truncation_latent=mean)
    w_plain = gen.get_latent(z)
    assert torch.allclose(w[:, 0], mean + 0.5 * (w_plain - mean), atol=1e-5)
    img_b, _ = gen([w], input_is_latent=True, randomize_noise=False)  # fixed noise: deterministic
    assert torch.allclose(img_a, img_b, atol=1e-5)
    img_c, _ = gen([w], input_is_latent=True, randomize_noise=True)
    assert not torch.allclose(img_a, img_c)
    s = gen.w_to_s(w)  # StyleSpace round trip
    assert [t.shape[1] for t in s] == gen.s_dims and len(s) == 3 * (gen.log_size - 2) + 2
    assert torch.allclose(gen.synthesize_s(s), img_a, atol=1e-5)
    unfused = Generator(**TINY, fused=False)
    unfused.load_state_dict(gen.state_dict())
    assert torch.allclose(unfused([w], input_is_latent=True, randomize_noise=False)[0], img_a, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(B, 8, 64\)"):
        gen([torch.randn(1, 18, 64)], input_is_latent=True)  # a 1024 px W+ given to a 32 px generator


def test_stylespace_dimensions_at_1024():
    gen = Generator(1024)  # ~0.3 s to build on CPU
    assert gen.s_dims == [512] * 15 + [256] * 3 + [128] * 3 + [64] * 3 + [32] * 2 and sum(gen.s_dims) == 9088
    assert gen.torgb_s_indices == list(range(1, 26, 3)) and gen.n_latent == 18 and gen.num_layers == 17
    from xclip.generation.global_directions import relevance_layers

    layers = relevance_layers(gen)
    assert layers == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15] and sum(gen.s_dims[j] for j in layers) == 5376


def test_upsample_preserves_constant_images():
    from xclip.models.stylegan2 import Upsample, upfirdn2d

    up = Upsample([1, 3, 3, 1])
    out = up(torch.ones(1, 2, 8, 8))
    assert out.shape == (1, 2, 16, 16)
    assert torch.allclose(out[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12), atol=1e-6)
    x = torch.randn(1, 1, 6, 6)  # identity kernel, no resampling: unchanged
    assert torch.allclose(upfirdn2d(x, torch.ones(1, 1)), x)


# ---- losses -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,out", [(32, 32), (64, 32), (64, 224), (256, 224)])
def test_styleclip_resize_equals_upsample_then_pool(size, out):
    from xclip.losses.styleclip import styleclip_resize

    x = torch.randn(2, 3, size, size)
    literal = F.adaptive_avg_pool2d(F.interpolate(x, scale_factor=7, mode="nearest"), out)
    assert torch.allclose(styleclip_resize(x, out), literal, atol=1e-5)


def test_arcface_loads_ir_se50_state_dict_strictly(tmp_path):
    from xclip.models.arcface import IRSE50, load_arcface

    shapes = irse50_shapes()
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.ones(s) if k.endswith("running_var") else torch.zeros(s, dtype=torch.long)
                 if k.endswith("num_batches_tracked") else torch.randn(s, generator=g) * 0.05)
             for k, s in shapes.items()}
    path = tmp_path / "model_ir_se50.pth"
    torch.save(state, path)
    net = load_arcface(path)
    assert isinstance(net, IRSE50) and set(net.state_dict()) == set(shapes)
    assert torch.equal(net.output_layer[3].weight, state["output_layer.3.weight"])
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # older PyTorch files
    torch.save(old, tmp_path / "old.pth")
    load_arcface(tmp_path / "old.pth")
    torch.save({"input_layer.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="bad.pth.*IR-SE50"):
        load_arcface(tmp_path / "bad.pth")


def test_identity_loss_zero_for_identical_images_and_positive_otherwise():
    from xclip.losses.styleclip import IDLoss
    from xclip.models.arcface import IRSE50, arcface_preprocess

    torch.manual_seed(0)
    net = IRSE50(stages=[(16, 16, 1), (16, 32, 1), (32, 32, 1), (32, 64, 1)], embed_dim=32)
    loss = IDLoss(net)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert arcface_preprocess(x).shape == (2, 3, 112, 112)
    assert loss(x, x.clone()).abs().item() < 1e-5
    assert loss(torch.rand(2, 3, 64, 64) * 2 - 1, x).item() > 1e-4


def test_clip_loss_is_one_minus_cosine(tiny_backbone):
    from xclip.losses.styleclip import ClipLoss

    loss = ClipLoss(tiny_backbone, "a person with purple hair")
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        e = tiny_backbone.encode_image(img)  # 32 px: the resize is the identity
        t = tiny_backbone.encode_text(tiny_backbone.tokenize(["a person with purple hair"]))
        assert torch.allclose(loss(img), 1 - (e @ t.t()).squeeze(1), atol=1e-5)


# ---- optimisation ---------------------------------------------------------------------------------------------
def test_lr_schedule_matches_spec():
    from xclip.generation.styleclip_optimize import get_lr

    lrs = [get_lr(i / 300, 0.1) for i in range(300)]
    assert lrs[0] == 0 and abs(lrs[5] - 0.0333) < 1e-3 and all(abs(v - 0.1) < 1e-9 for v in lrs[15:226])
    assert abs(lrs[250] - 0.075) < 1e-3 and lrs[299] < 1e-4


@pytest.fixture()
def tiny_setup(tiny_backbone):
    from xclip.generation.styleclip_optimize import initial_latent
    from xclip.losses.styleclip import ClipLoss

    gen = build_generator(None, **TINY)
    clip = ClipLoss(tiny_backbone, "a person with purple hair")
    return gen, clip, initial_latent(gen, "edit", 0.7, seed=0, n_mean=256)


def test_optimisation_lowers_clip_loss(tiny_setup):
    from xclip.generation.styleclip_optimize import OptimizeConfig, optimize_latent

    gen, clip, w0 = tiny_setup
    res = optimize_latent(gen, clip, w0, OptimizeConfig(steps=20), progress=False)
    before, after = res.history[0]["clip"], res.history[-1]["clip"]
    assert after < before - 0.03, (before, after)
    assert res.latent.shape == w0.shape and not torch.equal(res.latent, w0)
    assert torch.equal(res.latent_init, w0)
    res_s = optimize_latent(gen, clip, w0, OptimizeConfig(steps=8, work_in_stylespace=True), progress=False)
    assert res_s.history[-1]["clip"] < res_s.history[0]["clip"]
    torgb = gen.torgb_s_indices
    s0 = gen.w_to_s(w0)
    assert all(torch.equal(res_s.styles[j], s0[j]) for j in torgb)  # ToRGB S stays fixed
    with pytest.raises(ValueError, match=r"\(1, 8, 64\)"):
        optimize_latent(gen, clip, w0[0], OptimizeConfig(steps=1), progress=False)


def test_word_relevance_loss_weights_gradients_and_all_marked_guard(tiny_setup, caplog):
    from xclip.generation.styleclip_optimize import OptimizeConfig, WordRelevanceLoss, optimize_latent

    gen, clip, w0 = tiny_setup
    wl = WordRelevanceLoss(clip, [0, 0, 0, 1, 1])  # "purple hair": tokens 4, 5 (SOS is 0)
    assert wl.weights.nonzero().flatten().tolist() == [4, 5] and wl.n_marked == 2 and not wl.constant
    w = w0.clone().requires_grad_(True)
    e = wl(gen([w], input_is_latent=True, randomize_noise=False)[0])
    assert e.shape == (1,) and 0 < float(e.detach()) < 1
    (g,) = torch.autograd.grad(e.sum(), w)  # second-order path through the relevance reaches the latent
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with caplog.at_level(logging.WARNING):
        all_marked = WordRelevanceLoss(clip, [1, 1, 1, 1, 1])
    assert all_marked.constant and "constant" in caplog.text
    img = gen([w0], input_is_latent=True, randomize_noise=False)[0]
    assert torch.allclose(all_marked(img), torch.tensor([1 / all_marked.n_marked]), atol=1e-5)  # no NaN
    with pytest.raises(ValueError, match="5 words"):
        WordRelevanceLoss(clip, [0, 1])
    res = optimize_latent(gen, clip, w0, OptimizeConfig(steps=3, expl_weight=1.0), word_loss=wl, progress=False)
    assert all(math.isfinite(h["loss"]) and "expl" in h for h in res.history[:-1])


# ---- data ------------------------------------------------------------------------------------------------
def test_latent_file_with_wrong_shape_names_expected_shape(tmp_path):
    from xclip.datamodules.latents import load_latents

    torch.save(torch.randn(18, 512), tmp_path / "one_face.pt")
    with pytest.raises(ValueError, match=r"one_face.pt.*\(18, 512\).*\(N, 18, 512\) for a 1024 px.*unsqueeze"):
        load_latents(tmp_path / "one_face.pt", 1024, 512)
    torch.save(torch.randn(4, 18, 512), tmp_path / "faces.pt")
    with pytest.raises(ValueError, match=r"\(N, 14, 512\) for a 256 px"):
        load_latents(tmp_path / "faces.pt", 256, 512)
    assert load_latents(tmp_path / "faces.pt", 1024, 512).shape == (4, 18, 512)


# ---- global directions ----------------------------------------------------------------------------------
def test_global_directions_pipeline_and_cache(tiny_backbone, tmp_path):
    from xclip.generation import global_directions as gd

    gen = build_generator(None, **TINY)
    stats = gd.style_statistics(gen, n_samples=64, n_codes=4, batch_size=32, progress=False)
    assert [m.shape[0] for m in stats.mean] == gen.s_dims and stats.codes[0].shape == (4, 16)
    assert all((s >= 0).all() for s in stats.std)
    fs3, index = gd.channel_relevance(gen, tiny_backbone, stats, layers=[0, 2], n_images=4, cache_dir=tmp_path,
                                      progress=False)
    assert fs3.shape == (32, tiny_backbone.embed_dim) and index[0] == (0, 0) and index[-1] == (2, 15)
    assert torch.allclose(fs3.norm(dim=-1), torch.ones(32), atol=1e-4)
    cached = list(tmp_path.glob("fs3_*.pt"))
    assert len(cached) == 1
    fs3_again, _ = gd.channel_relevance(gen, tiny_backbone, stats, layers=[0, 2], n_images=4, cache_dir=tmp_path,
                                        progress=False)
    assert torch.equal(fs3, fs3_again)
    assert len(gd.imagenet_templates()) == 79
    dt = gd.text_direction(tiny_backbone, "face", "smiling face")
    assert abs(float(dt.norm()) - 1) < 1e-4
    r = fs3 @ dt
    beta = float(r.abs().sort(descending=True).values[5])  # keep exactly 6 channels
    scores = gd.channel_scores(fs3, dt, beta)
    assert int((scores != 0).sum()) == 6 and float(scores.abs().max()) == pytest.approx(1.0)
    delta = gd.style_delta(scores, index, stats)
    assert all(d.abs().sum() == 0 for j, d in enumerate(delta) if j not in (0, 2))
    s = gen.w_to_s(gen.get_latent(torch.randn(2, 64)).unsqueeze(1).repeat(1, gen.n_latent, 1))
    edited = gd.edit_styles(s, delta, alpha=3.0)
    assert torch.allclose(edited[0] - s[0], 3.0 * delta[0].unsqueeze(0))
    assert 0.1 <= gd.auto_beta(fs3, dt, c_threshold=2) <= 0.29


# ---- CLI ----------------------------------------------------------------------------------------------------
TINY_ARGS = ["--generator.size", "32", "--generator.style_dim", "64", "--generator.n_mlp", "2",
             "--generator.channel_max", "16", "--backbone", "tiny-vit-test", "--pretrained", "none", "--device", "cpu",
             "--progress", "false"]


def test_generate_cli_optimize_with_config_file(tmp_path, capsys):
    import json

    from xclip import generate

    cfg = tmp_path / "opt.yaml"
    cfg.write_text("description: a person with purple hair\nsteps: 4\nl2_lambda: 0.008\n"
                   "desired_words: [0, 0, 0, 1, 1]\nexpl_weight: 1.0\n")
    out = tmp_path / "out"
    res = generate.main(["styleclip-optimize", "--config", str(cfg), "--out", str(out), *TINY_ARGS])
    assert len(res.history) == 5
    assert (out / "final_result.png").is_file() and (out / "latent.pt").is_file()
    hist = json.loads((out / "history.json").read_text())
    assert hist["config"]["desired_words"] == [0, 0, 0, 1, 1] and hist["config"]["steps"] == 4
    assert hist["config"]["expl_weight"] == 1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        generate.main(["styleclip-optimize", "--config", str(bad), *TINY_ARGS])
    assert e.value.code != 0 and "stepz" in capsys.readouterr().err
    torch.save(torch.randn(8, 64), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"\(N, 8, 64\) for a 32 px"):
        generate.main(["styleclip-optimize", "--latent_path", str(tmp_path / "w.pt"), "--out", str(tmp_path / "o2"),
                       *TINY_ARGS])


def test_generate_cli_global(tmp_path):
    from xclip import generate

    out = tmp_path / "g"
    summary = generate.main(["styleclip-global", "--neutral", "face", "--target", "smiling face", "--beta", "auto",
                             "--c_threshold", "3", "--alpha", "2", "4", "--stats_samples", "32", "--n_images", "2",
                             "--max_resolution", "4", "--n_edit", "1", "--cache_dir", str(tmp_path / "c"),
                             "--out", str(out), *TINY_ARGS])
    assert (out / "global_edit.png").is_file() and summary["n_channels"] > 0
