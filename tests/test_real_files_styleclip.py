"""StyleCLIP's own mapper files (``mapper/training/coach.py`` ``checkpoint_me``) load and run as StyleCLIP runs them.

The file is written here in StyleCLIP's exact layout: ``torch.save({'state_dict': StyleCLIPMapper.state_dict(),
'opts': vars(opts)})``, so ``mapper.<course|medium|fine>_mapping.mapping.{1..4}.{weight,bias}`` for the enabled
levels only (``latent_mappers.LevelsMapper`` builds no module for a switched-off level), the generator as
``decoder.*`` (rosinality's ``Generator``), and ``opts`` the full option dict of ``mapper/options/train_options.py``
(+ ``device``, set by the Coach). The reference edit is computed here from the raw tensors with StyleCLIP's
formulas (PixelNorm over dim 1, EqualLinear lr_mul 0.01 + fused leaky ReLU, zeros for a disabled level,
w + 0.1 * M(w)), not with the project's classes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

SIZE, STYLE_DIM, N_MLP, CHANNEL_MAX = 64, 64, 2, 16
LEVELS = {"coarse": ("course_mapping", slice(0, 4)), "medium": ("medium_mapping", slice(4, 8)),
          "fine": ("fine_mapping", slice(8, None))}


pytestmark = pytest.mark.usefixtures("one_thread")


def styleclip_opts(**switches) -> dict:
    """vars(TrainOptions().parse()) of StyleCLIP's mapper training, + the Coach's opts.device."""
    opts = {"exp_dir": "results/purple", "mapper_type": "LevelsMapper", "no_coarse_mapper": False,
            "no_medium_mapper": False, "no_fine_mapper": False, "latents_train_path": "train_faces.pt",
            "latents_test_path": "test_faces.pt", "train_dataset_size": 5000, "test_dataset_size": 1000,
            "batch_size": 2, "test_batch_size": 1, "workers": 4, "test_workers": 2, "learning_rate": 0.5,
            "optim_name": "ranger", "id_lambda": 0.1, "clip_lambda": 1.0, "latent_l2_lambda": 0.8,
            "stylegan_weights": "../pretrained_models/stylegan2-ffhq-config-f.pt", "stylegan_size": SIZE,
            "ir_se50_weights": "../pretrained_models/model_ir_se50.pth", "checkpoint_path": None,
            "max_steps": 50000, "image_interval": 100, "board_interval": 50, "val_interval": 2000,
            "save_interval": 2000, "description": "a person with purple hair", "device": "cuda:0"}
    opts.update(switches)
    return opts


def styleclip_mapper_tensors(levels: dict[str, bool], seed: int = 0) -> dict[str, torch.Tensor]:
    """StyleCLIP's Mapper parameters: EqualLinear weight randn / lr_mul (init), random biases (trained)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for level, on in levels.items():
        if not on:
            continue
        name = LEVELS[level][0]
        for i in range(1, 5):
            out[f"mapper.{name}.mapping.{i}.weight"] = torch.randn(STYLE_DIM, STYLE_DIM, generator=g) / 0.01
            out[f"mapper.{name}.mapping.{i}.bias"] = torch.randn(STYLE_DIM, generator=g)
    return out


def reference_edit(w: torch.Tensor, tensors: dict[str, torch.Tensor], levels: dict[str, bool]) -> torch.Tensor:
    """StyleCLIP's w + 0.1 * LevelsMapper(w), from the raw tensors."""
    lr_mul, scale = 0.01, (1 / math.sqrt(STYLE_DIM)) * 0.01
    parts = []
    for level, (name, sl) in LEVELS.items():
        x = w[:, sl]
        if not levels[level]:
            parts.append(torch.zeros_like(x))
            continue
        x = x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)  # PixelNorm (dim 1: rows)
        for i in range(1, 5):
            x = F.linear(x, tensors[f"mapper.{name}.mapping.{i}.weight"] * scale)
            x = F.leaky_relu(x + tensors[f"mapper.{name}.mapping.{i}.bias"] * lr_mul, 0.2) * math.sqrt(2)
        parts.append(x)
    return w + 0.1 * torch.cat(parts, 1)


@pytest.fixture(scope="module")
def decoder():
    from xclip.models.stylegan2 import Generator

    torch.manual_seed(3)
    return Generator(SIZE, STYLE_DIM, N_MLP, channel_max=CHANNEL_MAX).eval()


def write_styleclip_file(path, decoder, levels: dict[str, bool], **opts_overrides) -> dict[str, torch.Tensor]:
    tensors = styleclip_mapper_tensors(levels)
    state = {**tensors, **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    switches = {f"no_{lvl}_mapper": not on for lvl, on in levels.items()}
    torch.save({"state_dict": state, "opts": styleclip_opts(**switches, **opts_overrides)}, path)
    return tensors


def test_styleclip_file_with_no_fine_mapper_loads(tmp_path, decoder):
    from xclip.models.mapper import load_styleclip_mapper, read_styleclip_mapper

    levels = {"coarse": True, "medium": True, "fine": False}  # --no_fine_mapper
    tensors = write_styleclip_file(tmp_path / "purple.pt", decoder, levels)
    f = read_styleclip_mapper(tmp_path / "purple.pt")
    assert f.kind == "styleclip" and f.mapper.enabled == levels and f.description == "a person with purple hair"
    assert not any(k.startswith("fine_mapping") for k in f.mapper.state_dict())
    assert set(f.decoder_state) == set(decoder.state_dict())
    w = torch.randn(3, 10, STYLE_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(f.mapper.edit(w), reference_edit(w, tensors, levels), atol=1e-5, rtol=1e-5)
    assert load_styleclip_mapper(tmp_path / "purple.pt").enabled == levels


@pytest.mark.parametrize("levels", [{"coarse": False, "medium": True, "fine": True},
                                    {"coarse": True, "medium": False, "fine": False}])
def test_other_level_switches(tmp_path, decoder, levels):
    from xclip.models.mapper import read_styleclip_mapper

    tensors = write_styleclip_file(tmp_path / "m.pt", decoder, levels)
    w = torch.randn(2, 10, STYLE_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = read_styleclip_mapper(tmp_path / "m.pt").mapper.edit(w)
    assert torch.allclose(got, reference_edit(w, tensors, levels), atol=1e-5, rtol=1e-5)


def test_inconsistent_or_unsupported_files_are_refused(tmp_path, decoder):
    from xclip.models.mapper import MapperFileError, read_styleclip_mapper

    levels = {"coarse": True, "medium": True, "fine": True}
    tensors = styleclip_mapper_tensors(levels)
    torch.save({"state_dict": tensors, "opts": styleclip_opts(no_fine_mapper=True)}, tmp_path / "bad.pt")
    with pytest.raises(MapperFileError, match=r"bad.pt: opts\['no_fine_mapper'\] says the fine level is off.*has "
                                              r"fine_mapping"):
        read_styleclip_mapper(tmp_path / "bad.pt")
    torch.save({"state_dict": tensors, "opts": styleclip_opts(mapper_type="SingleMapper")}, tmp_path / "single.pt")
    with pytest.raises(MapperFileError, match="SingleMapper"):
        read_styleclip_mapper(tmp_path / "single.pt")
    torch.save({"state_dict": tensors, "opts": styleclip_opts(work_in_stylespace=True)}, tmp_path / "ss.pt")
    with pytest.raises(MapperFileError, match="work_in_stylespace"):
        read_styleclip_mapper(tmp_path / "ss.pt")


def test_generate_styleclip_mapper_takes_styleclip_files(tmp_path, decoder):
    import json

    from torchvision.io import read_image

    from xclip import generate
    from xclip.datamodules.latents import load_latents

    levels = {"coarse": True, "medium": True, "fine": False}
    tensors = write_styleclip_file(tmp_path / "purple.pt", decoder, levels)
    w = torch.randn(3, 10, STYLE_DIM, generator=torch.Generator().manual_seed(5))
    torch.save(w, tmp_path / "test_faces.pt")
    out = tmp_path / "out"
    res = generate.main(["styleclip-mapper", "--ckpt", str(tmp_path / "purple.pt"), "--latents",
                         str(tmp_path / "test_faces.pt"), "--out", str(out), "--backbone", "tiny-vit-test",
                         "--pretrained", "none", "--batch_size", "2", "--device", "cpu", "--progress", "false"])
    expected = reference_edit(w, tensors, levels)
    edited = load_latents(out / "latents_edited.pt", SIZE, STYLE_DIM)
    assert torch.allclose(edited, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(edited[:, 8:], w[:, 8:])  # the fine rows are untouched (no fine mapper)
    with torch.no_grad():  # the file's decoder renders (randomize_noise=False, as StyleCLIP's inference)
        x_hat = decoder([expected], input_is_latent=True, randomize_noise=False)[0]
    pair = read_image(str(out / "pairs" / "00001.png")).float() / 255
    assert torch.allclose(pair[..., SIZE:], x_hat[1].clamp(-1, 1).add(1).div(2), atol=1 / 255 + 1e-6)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["checkpoint_kind"] == "styleclip" and stats["description"] == "a person with purple hair"
    assert stats["levels"] == levels and res["latents_edited"].shape == (3, 10, STYLE_DIM)
    # a StyleCLIP file without its decoder needs the generator
    state = torch.load(tmp_path / "purple.pt", weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if k.startswith("mapper.")}
    torch.save(state, tmp_path / "no_decoder.pt")
    with pytest.raises(RuntimeError, match="--generator_checkpoint"):
        generate.main(["styleclip-mapper", "--ckpt", str(tmp_path / "no_decoder.pt"), "--n_random", "1",
                       "--backbone", "tiny-vit-test", "--pretrained", "none", "--out", str(tmp_path / "x"),
                       "--device", "cpu", "--progress", "false"])
