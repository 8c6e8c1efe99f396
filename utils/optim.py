"""Lookahead and Ranger (RAdam + Lookahead + gradient centralisation), StyleCLIP's mapper optimiser.

Spec reference/styleclip_vqgan.md §3.4: StyleCLIP trains its mappers with Ranger (lessw2020's version 20.4.11)
at lr 0.5, betas (0.95, 0.999), eps 1e-5, Lookahead alpha 0.5 and k 6, gradient centralisation on every
parameter with more than one dimension.

``Lookahead(base, k, alpha)`` wraps any ``torch.optim.Optimizer`` (Zhang et al. 2019): the base optimiser
updates the fast weights every step; every k-th step the slow weights move towards them,
``slow <- slow + alpha * (fast - slow)``, and the fast weights are reset to the slow ones. The slow weights
start as the parameters' values at the first step. Param groups are *shared* with the base optimiser, so a
learning-rate scheduler or a Lightning LR monitor acting on the wrapper acts on the base optimiser too.

``Ranger`` is ``Lookahead(torch.optim.RAdam(...))`` whose step first centralises the gradients
(g <- g - mean of g over all dims but the first, for g.ndim > 1). torch's RAdam uses the same rectification
threshold (rho_t > 5), the same un-rectified fallback (bias-corrected momentum SGD) and the same eps placement
as the anchor; weight decay is the decoupled form (``decoupled_weight_decay=True``), as the anchor's
``p -= wd * lr * p``. A test checks Ranger step by step against the anchor's formulas.

Unlike the anchor, ``step(closure)`` evaluates the closure (Lightning passes forward + backward as a closure;
the anchor's step ignores it), and the Lookahead step counter lives in the optimiser's state dict, so a run
resumed from a checkpoint syncs on the same steps as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class Lookahead(Optimizer):
    """Lookahead around ``base``: every ``k`` base steps, slow += alpha * (fast - slow); fast <- slow."""

    def __init__(self, base: Optimizer, k: int = 6, alpha: float = 0.5):
        if not isinstance(base, Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Lookahead k must be an integer >= 1, got {k!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"Lookahead alpha must be in [0, 1], got {alpha!r}")
        self.base, self.k, self.alpha = base, k, float(alpha)
        self.lookahead_steps = 0
        self._shared = False
        super().__init__(base.param_groups, base.defaults)  # sets up hooks; self.state holds the slow weights
        self.param_groups = base.param_groups  # the same list of the same dicts
        self._shared = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._shared:
            self.base.add_param_group(param_group)  # lands in the shared list
        else:
            super().add_param_group(param_group)

    def _params(self) -> Iterable[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _prepare_gradients(self) -> None:
        """Hook run between the closure and the base step (Ranger: gradient centralisation)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self._params():  # slow weights = the values before the first update
            state = self.state[p]
            if "slow" not in state:
                state["slow"] = p.detach().clone()
        self._prepare_gradients()
        self.base.step()
        self.lookahead_steps += 1
        if self.lookahead_steps % self.k == 0:
            for p in self._params():
                slow = self.state[p]["slow"]
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss

    def state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._params())}
        slow = {index[id(p)]: s["slow"] for p, s in self.state.items() if "slow" in s and id(p) in index}
        return {"base": self.base.state_dict(),
                "lookahead": {"k": self.k, "alpha": self.alpha, "steps": self.lookahead_steps, "slow": slow}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "lookahead"}:
            raise ValueError("not a Lookahead state dict (expected keys 'base' and 'lookahead'); a checkpoint "
                             "written with another optimiser cannot resume with this one")
        la = state_dict["lookahead"]
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups  # load_state_dict rebuilt the base's group list
        params = list(self._params())
        if any(int(i) >= len(params) for i in la["slow"]):
            raise ValueError(f"Lookahead state has slow weights for {len(la['slow'])} parameters, "
                             f"the optimiser holds {len(params)}")
        self.state.clear()
        for i, t in la["slow"].items():
            p = params[int(i)]
            self.state[p]["slow"] = t.to(device=p.device, dtype=p.dtype).clone()
        self.k, self.alpha, self.lookahead_steps = int(la["k"]), float(la["alpha"]), int(la["steps"])


def centralize_gradients_(params: Iterable[torch.Tensor]) -> None:
    """g <- g - mean(g over all dims but the first), for every gradient with more than one dimension."""
    for p in params:
        g = p.grad
        if g is not None and g.ndim > 1:
            g.sub_(g.mean(dim=tuple(range(1, g.ndim)), keepdim=True))


class Ranger(Lookahead):
    """RAdam (torch.optim) + Lookahead + gradient centralisation; defaults of StyleCLIP's ranger.py."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.95, 0.999), eps: float = 1e-5,
                 weight_decay: float = 0.0, k: int = 6, alpha: float = 0.5, gradient_centralization: bool = True):
        if not lr > 0:
            raise ValueError(f"Ranger lr must be > 0, got {lr}")
        base = torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 decoupled_weight_decay=True)
        self.gradient_centralization = gradient_centralization
        super().__init__(base, k=k, alpha=alpha)

    def _prepare_gradients(self) -> None:
        if self.gradient_centralization:
            centralize_gradients_(self._params())
