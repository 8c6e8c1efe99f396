"""The CUDA path (issue 20): one step of every method on CUDA equals the CPU step; mixed precision; checkpoints.

Every comparison is built from one function ``_step_<method>(device, precision)`` that builds the model on the CPU
from a fixed seed, moves it to ``device``, runs one training / generation step under ``precision`` ("32",
"16-mixed", "bf16-mixed": autocast, as Lightning's MixedPrecision plugin) and returns the results on the CPU.

* fast tier (CPU, always runs): ``test_cpu_half[...]`` runs every step twice on the CPU (finite and bit-identical:
  the CPU reference is deterministic) and checks that nothing stays off the requested device;
  ``test_cpu_bf16_*`` run the CPU bf16 autocast path (CoOp + NTLB against fp32, world pretraining via Lightning).
* ``gpu`` tier (``make test-gpu`` = ``pytest -m gpu``; skipped without CUDA): the same steps on CUDA against the CPU.

Tolerances (fp32 with TF32 off on CUDA; relative L2 error ``|a - b| / |b|`` unless said):
  losses and relevance                          1e-5 (relevance: |a - b| <= 1e-5 * max|b| + 1e-6 elementwise)
  gradients, updated parameters (SGD / AdamW)   1e-4
  VQGAN-CLIP latent after one Adam step         1e-2 (Adam's first step is lr * sign(g): near-zero g may flip)
  ZeroCap next-token probabilities              1e-4 absolute
  CoOp + NTLB, mixed vs fp32 (same device)      loss 2e-3 (16-mixed) / 1e-2 (bf16-mixed), gradient 1e-2 / 3e-2;
                                                with fp32 image features the relevance pass is fp32: 1e-5 / 1e-4
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
gpu = [pytest.mark.gpu, requires_cuda]
NAMES = ["dog", "hot dog", "traffic_light", "cat"]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Full-precision fp32 on CUDA for the comparisons (TF32 would differ from the CPU by ~1e-3)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ helpers
def _autocast(device: str, precision: str):
    if precision in ("32", "32-true"):
        return contextlib.nullcontext()
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _cpu(out: dict) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float().cpu() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
            for k, v in out.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_on_device(module: torch.nn.Module, device: str) -> None:
    """Every parameter and buffer of ``module`` lives on ``device`` (nothing left behind by a .to())."""
    want = torch.device(device).type
    wrong = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers())
             if t.device.type != want]
    assert not wrong, f"tensors not on {device}: {wrong[:8]}"


def _grads(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


# ------------------------------------------------------------------------------------------------ steps
def _step_coop(device: str, precision: str = "32", expl_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """One SGD step of CoOp (+ NTLB when expl_weight > 0) on 3 random images."""
    from xclip.lightning_modules.coop import CoOp

    torch.manual_seed(0)
    m = CoOp("tiny-vit-test", None, classnames=NAMES, n_ctx=4, class_token_position="middle",
             expl_weight=expl_weight)
    with torch.no_grad():
        m.prompt_learner.ctx.normal_(0, 0.5)  # a context far from the init, so the relevance is not trivial
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 3, 1])
    m = m.to(device)
    assert_on_device(m, device)
    ctx = m.prompt_learner.ctx
    opt = torch.optim.SGD([ctx], lr=0.01, momentum=0.9)
    with _autocast(device, precision):
        out = m.compute_losses(x.to(device), y.to(device))
    out["loss"].backward()
    grad = ctx.grad.clone()
    opt.step()
    res = {"loss": out["loss"], "ce": out["ce"], "grad": grad, "ctx": ctx}
    if "expl" in out:
        res["expl"] = out["expl"]
    return _cpu(res)


def _step_coop_ntlb(device: str, precision: str = "32") -> dict[str, torch.Tensor]:
    return _step_coop(device, precision, expl_weight=1.0)


def _step_spelling(device: str, precision: str = "32") -> dict[str, torch.Tensor]:
    """One Adam step of the spelling projection W on random quintuple features."""
    from xclip.lightning_modules.spelling import SpellingProjection
    from xclip.losses.contrastive import spelling_objective

    torch.manual_seed(0)
    m = SpellingProjection("tiny-vit-test", None, k=8, preset="forget_to_spell").to(device)
    assert_on_device(m, device)
    g = torch.Generator().manual_seed(2)
    batch = {e: F.normalize(torch.randn(12, m.d, generator=g), dim=-1).to(device)
             for e in ("x_i", "x_t", "x_it", "y_t", "y_i")}
    opt = torch.optim.Adam([m.W], lr=1e-3)
    with _autocast(device, precision):
        total, _ = spelling_objective(m._project_batch(batch), m.loss_weights, m.W)
    total.backward()
    grad = m.W.grad.clone()
    opt.step()
    return _cpu({"loss": total, "grad": grad, "W": m.W})


MAPPER = dict(backbone="tiny-vit-test", pretrained=None, description="a person with purple hair",
              generator_size=64, style_dim=64, n_mlp=2, channel_max=16, id_lambda=0.0, n_mean_latent=64,
              image_log_every_n_steps=0, optimizer="adam", lr=0.01)


def _step_mapper(device: str, precision: str = "32") -> dict[str, torch.Tensor]:
    """One Adam step of the StyleCLIP latent mapper on two random z."""
    from xclip.lightning_modules.styleclip_mapper import StyleCLIPMapperModule

    torch.manual_seed(0)
    module = StyleCLIPMapperModule(**MAPPER).to(device)
    assert_on_device(module, device)
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)).to(device)
    params = list(module.mapper.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    with _autocast(device, precision):
        out, _, x_hat = module.losses(module.to_w_plus(z))
    out["loss"].backward()
    grad = _grads(params)
    opt.step()
    return _cpu({"loss": out["loss"], "clip": out["clip"], "grad": grad, "mapper": _flat(params),
                 "image_mean": x_hat.float().mean()})


def _step_vqgan(device: str, precision: str = "32") -> dict[str, torch.Tensor]:
    """One VQGAN-CLIP step with NTLB spatial conditioning (relevance with create_graph=True) at 64 px."""
    from xclip.generation.vqgan_clip import RegionPrompt, VQGANCLIPConfig, generate
    from xclip.models.clip_backbone import build_clip
    from xclip.models.vqgan import tiny_vqgan

    torch.manual_seed(0)
    vqgan = tiny_vqgan().to(device)
    backbone = build_clip("tiny-vit-test", None).freeze().to(device)
    assert_on_device(vqgan, device)
    cfg = VQGANCLIPConfig(width=64, height=64, steps=1, cutn=4, method="explainability", seed=0)
    with _autocast(device, precision):
        res = generate(vqgan, backbone, [RegionPrompt("a red circle", (0, 0, 32, 64))], cfg, progress=False)
    first = res.losses[0]
    return _cpu({"total": first["total"], "clip": first["clip"], "spatial": first["spatial"], "z": res.z,
                 "image": res.image})


def _tiny_lm():
    """A byte-level BPE + 1-layer GPT-2 with random weights (all local, a second to build)."""
    from _tiny_lm import random_gpt2

    lm, tok = random_gpt2(["Image of a red star", "a blue circle on the left"] * 20)
    return lm.eval(), tok


def _step_zerocap(device: str, precision: str = "32") -> dict[str, torch.Tensor]:
    """One ZeroCap generation step: the context shift (2 CLIP-guided iterations) and the fused next-token law."""
    from xclip.generation.zerocap import ZeroCap, ZeroCapConfig
    from xclip.models.clip_backbone import build_clip

    lm, tok = _tiny_lm()
    torch.manual_seed(0)
    clip = build_clip("tiny-vit-test", None).freeze().to(device)
    zc = ZeroCap(clip, lm.to(device), tok, ZeroCapConfig(num_iterations=2, top_size=8, beam_size=2))
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with _autocast(device, precision):
        target = zc.image_target(image.to(device))
        logp = zc.next_log_probs(zc.context_tokens(), 0, target)  # [1, V]
    return _cpu({"target": target, "probs": logp.float().exp()})


def _pretrain_batch(n: int = 8):
    from xclip.datamodules.synthetic_world import SyntheticWorldDataModule, collate

    dm = SyntheticWorldDataModule(seed=0, train_length=n, val_size=4, batch_size=n, image_size=32)
    return collate([dm.train_set[i] for i in range(n)])


def _step_pretrain(device: str, precision: str = "32") -> dict[str, torch.Tensor]:
    """One AdamW step of CLIP pretraining (open_clip ClipLoss) on 8 synthetic-world pairs."""
    from xclip.lightning_modules.clip_pretrain import ClipPretrain

    torch.manual_seed(0)
    model = ClipPretrain("tiny-vit-test", lr=1e-3, warmup_steps=1, max_steps=10).to(device)
    assert_on_device(model, device)
    model.setup("fit")
    batch = _pretrain_batch()
    params = [p for p in model.clip.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    with _autocast(device, precision):
        img, txt = model(batch["image"].to(device), model.clip.tokenize(batch["caption"]))
        loss = model.loss_fn(img, txt, model.clip.model.logit_scale.exp())
    loss.backward()
    grad = _grads(params)
    opt.step()
    return _cpu({"loss": loss, "grad": grad, "params": _flat(params)})


def _step_relevance(device: str, precision: str = "32") -> dict[str, torch.Tensor]:
    """Chefer text relevance (all layers) and image relevance (last layer) of a random tiny CLIP."""
    from xclip.models.clip_backbone import build_clip
    from xclip.models.relevance import image_relevance, text_relevance

    torch.manual_seed(0)
    backbone = build_clip("tiny-vit-test", None).freeze().to(device)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)).to(device)
    tokens = backbone.tokenize(["a red circle", "a photo of a blue square on the left"])
    with _autocast(device, precision):
        t = text_relevance(backbone, images, tokens)
        i = image_relevance(backbone, images, tokens, start_layer=0)
    return _cpu({"text": t, "image": i})


STEPS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "coop": _step_coop, "coop_ntlb": _step_coop_ntlb, "spelling": _step_spelling, "styleclip_mapper": _step_mapper,
    "vqgan_clip": _step_vqgan, "zerocap": _step_zerocap, "world_pretraining": _step_pretrain,
    "relevance": _step_relevance,
}
# per result key: (kind, tolerance) -- "rel": relative L2; "abs": max absolute; "elem": relevance rule
TOLERANCES: dict[str, dict[str, tuple[str, float]]] = {
    "coop": {"loss": ("rel", 1e-5), "ce": ("rel", 1e-5), "grad": ("rel", 1e-4), "ctx": ("rel", 1e-4)},
    "coop_ntlb": {"loss": ("rel", 1e-5), "ce": ("rel", 1e-5), "expl": ("rel", 1e-5), "grad": ("rel", 1e-4),
                  "ctx": ("rel", 1e-4)},
    "spelling": {"loss": ("rel", 1e-5), "grad": ("rel", 1e-4), "W": ("rel", 1e-4)},
    "styleclip_mapper": {"loss": ("rel", 1e-5), "clip": ("rel", 1e-5), "grad": ("rel", 1e-4),
                         "mapper": ("rel", 1e-4), "image_mean": ("abs", 1e-5)},
    "vqgan_clip": {"total": ("rel", 1e-5), "clip": ("rel", 1e-5), "spatial": ("rel", 1e-4), "z": ("rel", 1e-2),
                   "image": ("rel", 1e-2)},
    "zerocap": {"target": ("rel", 1e-5), "probs": ("abs", 1e-4)},
    "world_pretraining": {"loss": ("rel", 1e-5), "grad": ("rel", 1e-4), "params": ("rel", 1e-4)},
    "relevance": {"text": ("elem", 1e-5), "image": ("elem", 1e-5)},
}


def assert_matches(got: dict, ref: dict, tolerances: dict[str, tuple[str, float]], what: str) -> None:
    assert set(got) == set(ref), (set(got), set(ref))
    for key, (kind, tol) in tolerances.items():
        a, b = got[key], ref[key]
        assert a.shape == b.shape, f"{what}/{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if kind == "rel":
            err = _rel(a, b)
        elif kind == "abs":
            err = float((a - b).abs().max())
        else:  # relevance: elementwise |a - b| <= tol * max|b| + 1e-6
            err = float(((a - b).abs() - 1e-6).clamp_min(0).max() / b.abs().max().clamp_min(1e-30))
        assert err <= tol, f"{what}/{key}: error {err:.3g} > {tol:g} ({kind})"


# ------------------------------------------------------------------------------------------------ fast tier
@pytest.mark.parametrize("method", list(STEPS))
def test_cpu_half(method):
    """The CPU reference of every comparison: finite and bit-identical when repeated (device-agnostic code path:
    models built on the CPU then moved with .to(device), inputs moved explicitly)."""
    a, b = STEPS[method]("cpu"), STEPS[method]("cpu")
    assert set(a) == set(TOLERANCES[method]), (sorted(a), sorted(TOLERANCES[method]))
    for k in a:
        assert torch.isfinite(a[k]).all(), f"{method}/{k} not finite"
        assert torch.equal(a[k], b[k]), f"{method}/{k} differs between two CPU runs"


def _mixed_vs_fp32(device: str, precision: str) -> tuple[dict, dict]:
    return _step_coop_ntlb(device, precision), _step_coop_ntlb(device, "32")


MIXED_TOL = {"16-mixed": (2e-3, 1e-2), "bf16-mixed": (1e-2, 3e-2)}  # (loss, gradient) relative


def _check_mixed(device: str, precision: str) -> None:
    mixed, fp32 = _mixed_vs_fp32(device, precision)
    loss_tol, grad_tol = MIXED_TOL[precision]
    assert mixed["expl"].item() != 0 and torch.isfinite(mixed["grad"]).all()
    for key in ("loss", "expl", "ce"):
        assert _rel(mixed[key], fp32[key]) <= loss_tol, (key, mixed[key], fp32[key])
    assert _rel(mixed["grad"], fp32["grad"]) <= grad_tol, _rel(mixed["grad"], fp32["grad"])


def _relevance_pass_is_fp32(device: str, precision: str) -> None:
    """With the same (fp32) image features, the NTLB loss under autocast equals fp32: relevance runs in fp32."""
    from xclip.lightning_modules.coop import CoOp
    from xclip.losses.explainability import coop_expl_loss

    torch.manual_seed(0)
    m = CoOp("tiny-vit-test", None, classnames=NAMES, n_ctx=4, class_token_position="middle", expl_weight=1.0)
    with torch.no_grad():
        m.prompt_learner.ctx.normal_(0, 0.5)
    m = m.to(device)
    pl_ = m.prompt_learner
    x, y = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device), \
        torch.tensor([0, 3, 1], device=device)
    img = m.image_features(x).float()  # fp32, outside autocast

    def run(ctx):
        with ctx:
            embeds, eot = pl_()
            loss, scores, _ = coop_expl_loss(m.backbone, img, embeds, eot, pl_.name_mask, y)
        (g,) = torch.autograd.grad(loss, pl_.ctx)
        return loss.detach(), scores, g

    ref, mixed = run(contextlib.nullcontext()), run(_autocast(device, precision))
    assert mixed[0].dtype == torch.float32 and mixed[1].dtype == torch.float32
    assert _rel(mixed[0], ref[0]) <= 1e-5 and _rel(mixed[1], ref[1]) <= 1e-5
    assert _rel(mixed[2], ref[2]) <= 1e-4, _rel(mixed[2], ref[2])


def test_cpu_bf16_coop_ntlb_matches_fp32():
    """CPU bf16 autocast (the path Lightning's bf16-mixed takes on CPU) of CoOp + NTLB against fp32."""
    _check_mixed("cpu", "bf16-mixed")
    _relevance_pass_is_fp32("cpu", "bf16-mixed")


def _pretrain_with_lightning(accelerator: str, precision: str, steps: int = 3) -> list[float]:
    import pytorch_lightning as pl

    from xclip.datamodules.synthetic_world import SyntheticWorldDataModule
    from xclip.lightning_modules.clip_pretrain import ClipPretrain

    class Record(pl.Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    pl.seed_everything(0, verbose=False)
    dm = SyntheticWorldDataModule(seed=0, train_length=8 * steps, val_size=4, batch_size=8, image_size=32)
    model = ClipPretrain("tiny-vit-test", lr=2e-3, warmup_steps=1, max_steps=steps)
    rec = Record()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[rec])
    trainer.fit(model, datamodule=dm)
    assert_on_device(model, "cuda" if accelerator == "gpu" else "cpu")
    return rec.losses


def test_cpu_bf16_world_pretraining_runs():
    losses = _pretrain_with_lightning("cpu", "bf16-mixed")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def _coop_checkpoint(tmp_path, device: str):
    """Train tiny CoOp one step on ``device`` with Lightning, save it; returns (path, logits of the saved model)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from xclip.lightning_modules.coop import CoOp

    torch.manual_seed(0)
    model = CoOp("tiny-vit-test", None, classnames=NAMES, n_ctx=4, warmup_epochs=0)
    g = torch.Generator().manual_seed(6)
    data = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])),
                      batch_size=4)
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=data)
    path = tmp_path / f"coop_{device}.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model.eval()(x.to(model.device)).cpu()
    return path, x, logits


def _evaluate_checkpoint(path, x, device: str) -> torch.Tensor:
    from xclip.lightning_modules.base import load_method_checkpoint
    from xclip.lightning_modules.coop import CoOp

    torch.manual_seed(0)  # the frozen random tiny CLIP is rebuilt from the seed it was built with (not saved)
    model = load_method_checkpoint(path, CoOp, map_location=device)
    assert_on_device(model, device)
    with torch.no_grad():
        return model(x.to(device)).cpu()


def test_cpu_half_checkpoint_round_trip(tmp_path):
    path, x, logits = _coop_checkpoint(tmp_path, "cpu")
    assert torch.allclose(_evaluate_checkpoint(path, x, "cpu"), logits, atol=1e-6)


# ------------------------------------------------------------------------------------------------ gpu tier
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method", list(STEPS))
def test_cuda_step_equals_cpu(method):
    assert_matches(STEPS[method]("cuda"), STEPS[method]("cpu"), TOLERANCES[method], method)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_cuda_mixed_precision_coop_ntlb_matches_fp32(precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    _check_mixed("cuda", precision)
    _relevance_pass_is_fp32("cuda", precision)


@pytest.mark.gpu
@requires_cuda
def test_cuda_world_pretraining_bf16_mixed_runs():
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    losses = _pretrain_with_lightning("gpu", "bf16-mixed", steps=4)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.gpu
@requires_cuda
def test_cpu_saved_checkpoint_evaluates_on_cuda(tmp_path):
    path, x, logits = _coop_checkpoint(tmp_path, "cpu")
    assert _rel(_evaluate_checkpoint(path, x, "cuda"), logits) <= 1e-5


@pytest.mark.gpu
@requires_cuda
def test_cuda_saved_checkpoint_evaluates_on_cpu(tmp_path):
    path, x, logits = _coop_checkpoint(tmp_path, "cuda")
    assert _rel(_evaluate_checkpoint(path, x, "cpu"), logits) <= 1e-5
