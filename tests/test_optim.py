"""Lookahead / Ranger (utils/optim.py): exact Lookahead values on a toy quadratic, Ranger against the
anchor's formulas written out here (spec styleclip_vqgan.md §3.4), gradient centralisation, resuming."""
from __future__ import annotations

import math

import pytest
import torch

from xclip.utils.optim import Lookahead, Ranger


def _sgd_quadratic(x0: list[float], steps: int, k: int = 6, alpha: float = 0.5, lr: float = 0.1):
    """f(x) = 0.5 * |x|^2 with SGD(lr) inside Lookahead; returns the parameter after every step + slow weights."""
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = Lookahead(torch.optim.SGD([x], lr=lr), k=k, alpha=alpha)
    values, slows = [], []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x.pow(2).sum()).backward()
        opt.step()
        values.append(x.detach().clone())
        slows.append(opt.state[x]["slow"].clone())
    return values, slows


def test_lookahead_on_a_quadratic_matches_hand_computation():
    # SGD on 0.5 x^2 multiplies x by (1 - lr) = 0.9 per step. With k = 6, alpha = 0.5, from x0 = 1:
    #   steps 1..5: x = 0.9^t, slow stays 1;
    #   step 6: fast 0.9^6 = 0.531441, slow = 1 + 0.5 * (0.531441 - 1) = 0.7657205, x reset to 0.7657205;
    #   steps 7..11: x = 0.7657205 * 0.9^j; step 12: slow = 0.7657205 * (1 + 0.531441) / 2 = 0.58632788...
    values, slows = _sgd_quadratic([1.0], 12)
    expected = [0.9, 0.81, 0.729, 0.6561, 0.59049, 0.7657205,
                0.68914845, 0.620233605, 0.5582102445, 0.50238922005, 0.452150298045, 0.58632788]
    got = [v.item() for v in values]
    assert got == pytest.approx(expected, abs=1e-8)
    assert [s.item() for s in slows[:5]] == [1.0] * 5  # slow weights only move on every k-th step
    assert slows[5].item() == pytest.approx(0.7657205) and slows[11].item() == pytest.approx(0.7657205 ** 2)
    assert [s.item() for s in slows[6:11]] == [pytest.approx(0.7657205)] * 5
    # vector parameters are interpolated element-wise; the scale factor per cycle is (1 + 0.9^6) / 2
    values, _ = _sgd_quadratic([2.0, -4.0], 18)
    assert torch.allclose(values[-1], torch.tensor([2.0, -4.0], dtype=torch.float64) * 0.7657205 ** 3)


def test_lookahead_alpha_extremes_and_argument_checks():
    values, _ = _sgd_quadratic([1.0], 6, alpha=1.0)  # alpha 1: the slow weights follow the fast ones
    assert values[-1].item() == pytest.approx(0.9 ** 6)
    values, _ = _sgd_quadratic([1.0], 6, alpha=0.0)  # alpha 0: back to the start every k steps
    assert values[-1].item() == 1.0 and values[-2].item() == pytest.approx(0.9 ** 5)
    values, _ = _sgd_quadratic([1.0], 3, k=1, alpha=0.5)  # k 1: x <- x * (1 + 0.9) / 2 each step
    assert values[-1].item() == pytest.approx(0.95 ** 3)
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(torch.optim.SGD(p, lr=0.1), alpha=1.5)
    with pytest.raises(ValueError, match="k must be"):
        Lookahead(torch.optim.SGD(p, lr=0.1), k=0)
    with pytest.raises(TypeError):
        Lookahead(p)


def test_lookahead_shares_param_groups_and_resumes_from_its_state_dict():
    def make(seed_params=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        if seed_params is not None:
            model.load_state_dict(seed_params)
        return model, Lookahead(torch.optim.Adam(model.parameters(), lr=0.05), k=6, alpha=0.5)

    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)

    def step(model, opt):
        def closure():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            return loss
        return opt.step(closure)

    model, opt = make()
    assert opt.param_groups is opt.base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)  # acts on the base through the wrapper
    ref = []
    for _ in range(12):
        loss = step(model, opt)
        sched.step()
        ref.append(loss.item())
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 2)
    ref_params = [p.detach().clone() for p in model.parameters()]

    model, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for _ in range(4):  # interrupt mid-cycle
        step(model, opt)
        sched.step()
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), sched.state_dict())
    assert saved[1]["lookahead"]["steps"] == 4 and len(saved[1]["lookahead"]["slow"]) == 2
    model, opt = make(saved[0])
    opt.load_state_dict(saved[1])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    sched.load_state_dict(saved[2])
    assert opt.param_groups is opt.base.param_groups
    resumed = []
    for _ in range(8):
        resumed.append(step(model, opt).item())
        sched.step()
    assert resumed == pytest.approx(ref[4:], rel=1e-6)
    for p, q in zip(model.parameters(), ref_params):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ValueError, match="not a Lookahead state dict"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


def _ranger_reference(params, loss_fn, steps, lr, betas=(0.95, 0.999), eps=1e-5, k=6, alpha=0.5):
    """StyleCLIP's Ranger (lessw2020 20.4.11) as the spec describes it, written out per parameter."""
    b1, b2 = betas
    rho_inf = 2 / (1 - b2) - 1
    slow = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    rhos = []
    for t in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss_fn().backward()
        rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
        rhos.append(rho)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad.clone()
                if g.ndim > 1:  # gradient centralisation
                    g -= g.mean(dim=tuple(range(1, g.ndim)), keepdim=True)
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                if rho > 5:
                    step = math.sqrt((1 - b2 ** t) * (rho - 4) / (rho_inf - 4) * (rho - 2) / rho
                                     * rho_inf / (rho_inf - 2)) / (1 - b1 ** t)
                    p -= lr * step * m[i] / (v[i].sqrt() + eps)
                else:
                    p -= lr * m[i] / (1 - b1 ** t)
                if t % k == 0:
                    slow[i] += alpha * (p - slow[i])
                    p.copy_(slow[i])
    return rhos


def test_ranger_matches_the_anchor_formulas_step_by_step():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    w0, b0 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)

    def setup():
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        return [w, b], lambda: (x @ w.T + b - y).pow(2).mean()

    ref_params, ref_loss = setup()
    rhos = _ranger_reference(ref_params, ref_loss, steps=13, lr=0.05)
    assert rhos[3] < 5 < rhos[-1]  # both RAdam branches (un-rectified first steps, then rectified) are covered

    params, loss_fn = setup()
    opt = Ranger(params, lr=0.05)
    assert (opt.k, opt.alpha) == (6, 0.5) and opt.base.defaults["betas"] == (0.95, 0.999)
    assert opt.base.defaults["eps"] == 1e-5
    for _ in range(13):
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        assert torch.is_tensor(opt.step(closure))  # the closure is evaluated (Lightning passes one)
    for p, q in zip(params, ref_params):
        assert torch.allclose(p, q, atol=1e-10, rtol=0), (p - q).abs().max()
    assert not torch.allclose(params[0], w0)


def test_ranger_centralises_matrix_gradients_only():
    def first_step(gc: bool):
        w = torch.nn.Parameter(torch.zeros(2, 3))
        b = torch.nn.Parameter(torch.zeros(2))
        opt = Ranger([w, b], lr=0.1, gradient_centralization=gc)
        w.grad = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])  # constant along each row
        b.grad = torch.tensor([1.0, 1.0])
        opt.step()
        return w.detach(), b.detach()

    w, b = first_step(True)
    assert torch.equal(w, torch.zeros(2, 3))  # a row-constant gradient is removed entirely by GC
    assert torch.allclose(b, torch.tensor([-0.1, -0.1]))  # 1-D parameters are not centralised
    w, _ = first_step(False)
    assert torch.allclose(w, torch.tensor([[-0.1] * 3, [0.2] * 3]))
