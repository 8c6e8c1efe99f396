"""StyleCLIP latent mapper: levels, training lowers the loss, slim checkpoints, latent files."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

TINY_MODULE = dict(backbone="tiny-vit-test", pretrained=None, description="a person with purple hair",
                   generator_size=64, style_dim=64, n_mlp=2, channel_max=16, id_lambda=0.0,
                   n_mean_latent=256, image_log_every_n_steps=0)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_levels_mapper_slices_and_disabled_levels():
    from models.mapper import LevelsMapper

    w = torch.randn(2, 18, 32)
    m = LevelsMapper(32, coarse=True, medium=False, fine=True)
    d = m(w)
    assert d.shape == w.shape and d[:, 4:8].abs().sum() == 0 and d[:, :4].abs().sum() > 0
    assert d[:, 8:].abs().sum() > 0
    assert torch.allclose(m.edit(w), w + 0.1 * d)
    names = {k.split(".")[0] for k in m.state_dict()}
    assert names == {"course_mapping", "medium_mapping", "fine_mapping"}  # StyleCLIP's names (sic)
    assert "course_mapping.mapping.4.weight" in m.state_dict()
    assert sum(p.numel() for p in LevelsMapper(512).parameters()) == 3_151_872  # spec 3.1
    with pytest.raises(ValueError):
        LevelsMapper(32, coarse=False, medium=False, fine=False)


def test_mapper_needs_arcface_when_id_loss_is_on():
    from lightning_modules.styleclip_mapper import StyleCLIPMapperModule

    with pytest.raises(ValueError, match="arcface_checkpoint"):
        StyleCLIPMapperModule(**{**TINY_MODULE, "id_lambda": 0.1})


def test_mapper_training_lowers_loss_and_checkpoint_is_slim(tmp_path):
    from datamodules.latents import LatentsDataModule
    from lightning_modules.base import load_method_checkpoint
    from lightning_modules.styleclip_mapper import StyleCLIPMapperModule

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
    from datamodules.latents import LatentsDataModule

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
