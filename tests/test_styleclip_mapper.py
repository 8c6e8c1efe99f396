"""StyleCLIP latent mapper: levels, training lowers the loss, slim checkpoints, latent files."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

TINY_MODULE = dict(backbone="tiny-vit-test", pretrained=None, description="a person with purple hair",
                   generator_size=64, style_dim=64, n_mlp=2, channel_max=16, id_lambda=0.0,
                   n_mean_latent=256, image_log_every_n_steps=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_levels_mapper_slices_and_disabled_levels():
    from xclip.models.mapper import LevelsMapper

    w = torch.randn(2, 18, 32)
    m = LevelsMapper(32, coarse=True, medium=False, fine=True)
    d = m(w)
    assert d.shape == w.shape and d[:, 4:8].abs().sum() == 0 and d[:, :4].abs().sum() > 0
    assert d[:, 8:].abs().sum() > 0
    assert torch.allclose(m.edit(w), w + 0.1 * d)
    names = {k.split(".")[0] for k in m.state_dict()}
    assert names == {"course_mapping", "fine_mapping"}  # StyleCLIP's names (sic); a disabled level has none
    assert "course_mapping.mapping.4.weight" in m.state_dict()
    assert {k.split(".")[0] for k in LevelsMapper(32).state_dict()} == {"course_mapping", "medium_mapping",
                                                                         "fine_mapping"}
    assert sum(p.numel() for p in LevelsMapper(512).parameters()) == 3_151_872  # spec 3.1
    with pytest.raises(ValueError):
        LevelsMapper(32, coarse=False, medium=False, fine=False)


def test_mapper_needs_arcface_when_id_loss_is_on():
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule

    with pytest.raises(ValueError, match="arcface_checkpoint"):
        StyleCLIPMapperModule(**{**TINY_MODULE, "id_lambda": 0.1})


def test_mapper_training_lowers_loss_and_checkpoint_is_slim(tmp_path):
    from xclip.datamodules.latents import LatentsDataModule
    from xclip.lightning_modules.base import load_method_checkpoint
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule

    torch.manual_seed(0)
    module = StyleCLIPMapperModule(**TINY_MODULE, optimizer="adam", lr=2.0)  # lr_mul 0.01 inside
    w_eval = module.to_w_plus(torch.randn(4, 64, generator=torch.Generator().manual_seed(7)))  # z -> W+
    assert w_eval.shape == (4, 10, 64)
    with torch.no_grad():
        before = module.losses(w_eval)[0]["loss"].item()
    data = LatentsDataModule(generator_size=64, style_dim=64, batch_size=4, n_train_samples=64, n_test_samples=2)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_steps=15, logger=False, callbacks=[ckpt_cb], enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=data)
    with torch.no_grad():
        after = module.losses(w_eval)[0]["loss"].item()
    assert after < before - 0.01, (before, after)

    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("mapper.") for k in ckpt["state_dict"])
    assert ckpt["method"].endswith("StyleCLIPMapperModule")
    restored = load_method_checkpoint(tmp_path / "last.ckpt", expected=StyleCLIPMapperModule)
    with torch.no_grad():
        assert torch.allclose(restored.edit(w_eval), module.edit(w_eval), atol=1e-6)
        assert torch.allclose(restored.render(w_eval), module.render(w_eval), atol=1e-5)  # same frozen G


def test_latent_files_feed_the_mapper_and_bad_shapes_fail(tmp_path):
    from xclip.datamodules.latents import LatentsDataModule

    torch.save(torch.randn(6, 10, 64), tmp_path / "train_faces.pt")
    dm = LatentsDataModule(str(tmp_path / "train_faces.pt"), str(tmp_path / "train_faces.pt"), generator_size=64,
                           style_dim=64, batch_size=2)
    dm.setup("fit")
    (batch,) = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 10, 64)
    torch.save(torch.randn(6, 18, 512), tmp_path / "ffhq_faces.pt")
    bad = LatentsDataModule(str(tmp_path / "ffhq_faces.pt"), generator_size=64, style_dim=64)
    with pytest.raises(ValueError, match=r"ffhq_faces.pt.*\(6, 18, 512\).*\(N, 10, 64\) for a 64 px"):
        bad.setup("fit")


# ---- Ranger (the default optimiser) and the `xclip generate styleclip-mapper` subcommand --------------
# The random tiny CLIP gives gradients of ~1e-7 per mapper weight, far below Ranger's eps 1e-5 (which then
# dominates the denominator), and RAdam's rectification keeps the first steps tiny (SGD-like for t <= 5, then
# scaled by ~0.03-0.09 up to step 18), so the 18-step tiny run lowers eps and raises lr. The paper configs keep
# StyleCLIP's lr 0.5 / eps 1e-5 for 50k steps.
RANGER_TINY = dict(optimizer="ranger", lr=100.0, ranger_eps=1e-8)


@pytest.fixture(scope="module")
def ranger_run(tmp_path_factory):
    """Train the tiny mapper for 18 Ranger steps (3 Lookahead cycles); returns (module, ckpt, w, losses)."""
    from xclip.datamodules.latents import LatentsDataModule
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule
    from xclip.utils.optim import Ranger

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ranger")
    torch.manual_seed(0)
    module = StyleCLIPMapperModule(**TINY_MODULE, **RANGER_TINY)
    w_eval = module.to_w_plus(torch.randn(4, 64, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        before = module.losses(w_eval)[0]["loss"].item()
    data = LatentsDataModule(generator_size=64, style_dim=64, batch_size=4, n_train_samples=64, n_test_samples=2)
    trainer = pl.Trainer(max_steps=18, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True)],
                         limit_val_batches=1, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=data)
    assert isinstance(trainer.optimizers[0], Ranger)
    with torch.no_grad():
        after = module.losses(w_eval)[0]["loss"].item()
    torch.set_num_threads(n)
    return module.eval(), tmp / "last.ckpt", w_eval, (before, after)


def test_mapper_training_with_ranger_lowers_loss(ranger_run):
    module, ckpt_path, _, (before, after) = ranger_run
    assert module.hparams.optimizer == "ranger"
    assert after < before - 0.01, (before, after)
    opt_state = torch.load(ckpt_path, weights_only=False)["optimizer_states"][0]
    assert opt_state["lookahead"]["steps"] == 18 and (opt_state["lookahead"]["k"], opt_state["lookahead"]["alpha"]) \
        == (6, 0.5)  # the Lookahead counter is checkpointed, so a resumed run syncs on the same steps


def test_generate_styleclip_mapper_applies_the_trained_mapper(ranger_run, tmp_path):
    import json

    from torchvision.io import read_image

    from xclip import generate
    from xclip.datamodules.latents import load_latents

    module, ckpt_path, w_eval, _ = ranger_run
    w = w_eval[:3].clone()  # 3 latents, batch 2: the last batch is partial
    w[2] += 0.5 * torch.randn(w[2].shape, generator=torch.Generator().manual_seed(3))
    torch.save(w, tmp_path / "faces.pt")
    out = tmp_path / "out"
    res = generate.main(["styleclip-mapper", "--ckpt", str(ckpt_path), "--latents", str(tmp_path / "faces.pt"),
                         "--out", str(out), "--batch_size", "2", "--device", "cpu", "--progress", "false"])
    edited = load_latents(out / "latents_edited.pt", 64, 64)
    assert torch.equal(load_latents(out / "latents_source.pt", 64, 64), w)
    with torch.no_grad():
        expected = w + 0.1 * module.mapper(w)  # the *trained* mapper (a re-initialised one would differ)
        x, x_hat = module.render(w), module.render(expected)
    assert torch.allclose(edited, expected, atol=1e-5)
    assert (edited - w).abs().mean() > 1e-2  # the edit is not the identity
    for i in range(3):
        pair = read_image(str(out / "pairs" / f"{i:05d}.png")).float() / 255  # [3, 64, 128]: before | after
        before, after = pair[..., :64], pair[..., 64:]
        assert torch.allclose(before, x[i].clamp(-1, 1).add(1).div(2), atol=1 / 255 + 1e-6)
        assert torch.allclose(after, x_hat[i].clamp(-1, 1).add(1).div(2), atol=1 / 255 + 1e-6)
        assert (after - before).abs().mean() > 1e-3
    assert (out / "grid.png").is_file()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n"] == 3 and stats["latent_mse"] > 0 and stats["description"] == "a person with purple hair"
    assert stats["clip_loss_after"] == pytest.approx(module.clip_loss(x_hat).mean().item(), abs=1e-5)
    assert res["latents_edited"].shape == (3, 10, 64)

    rnd = generate.main(["styleclip-mapper", "--ckpt", str(ckpt_path), "--n_random", "2", "--out",
                         str(tmp_path / "rnd"), "--pairs", "false", "--device", "cpu", "--progress", "false"])
    src = rnd["latents_source"]
    assert src.shape == (2, 10, 64) and torch.allclose(src[:, 0], src[:, 5])  # one truncated w repeated
    assert torch.allclose(rnd["latents_edited"], src + 0.1 * module.mapper(src), atol=1e-5)
    assert not (tmp_path / "rnd" / "pairs").exists() and (tmp_path / "rnd" / "grid.png").is_file()

    torch.save(torch.randn(2, 18, 512), tmp_path / "ffhq.pt")
    with pytest.raises(ValueError, match=r"\(2, 18, 512\).*\(N, 10, 64\) for a 64 px"):
        generate.main(["styleclip-mapper", "--ckpt", str(ckpt_path), "--latents", str(tmp_path / "ffhq.pt"),
                       "--out", str(tmp_path / "bad"), "--device", "cpu", "--progress", "false"])
    with pytest.raises(RuntimeError, match="not a Lightning checkpoint"):
        generate.main(["styleclip-mapper", "--ckpt", str(tmp_path / "faces.pt"), "--n_random", "1",
                       "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="--latents FILE or --n_random N"):
        generate.main(["styleclip-mapper", "--ckpt", str(ckpt_path), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_before_after_grid_goes_to_wandb(ranger_run):
    from types import SimpleNamespace

    from pytorch_lightning.loggers import WandbLogger

    class RecordingWandb(WandbLogger):  # records log_image calls; never starts a W&B run
        def __init__(self):
            self.calls = []

        def log_image(self, key, images, step=None, **kwargs):
            self.calls.append((key, images, step, kwargs))

    module, _, w_eval, _ = ranger_run
    rec = RecordingWandb()
    module._trainer = SimpleNamespace(logger=rec, loggers=[rec], is_global_zero=True, global_step=7)
    try:
        with torch.no_grad():
            x, x_hat = module.render(w_eval), module.render(module.edit(w_eval))
        module._log_pairs("val/edits", x, x_hat)
    finally:
        module._trainer = None
    (key, images, step, kwargs), = rec.calls
    grid = torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255  # uint8 HWC, make_grid(nrow=2, padding=2)
    assert images[0].dtype.name == "uint8"  # a [0, 1] float grid would be cast to black by wandb
    assert key == "val/edits" and step == 7 and "before | after" in kwargs["caption"][0]
    assert grid.shape == (3, 4 * 66 + 2, 2 * 66 + 2)
    assert torch.allclose(grid[:, 2:66, 2:66], x[0].clamp(-1, 1).add(1).div(2), atol=0.5 / 255 + 1e-6)
    assert torch.allclose(grid[:, 2:66, 68:132], x_hat[0].clamp(-1, 1).add(1).div(2), atol=0.5 / 255 + 1e-6)
