"""Validation metrics of the spelling projections (disentangle.md 5.1), as torchmetrics Metrics.

Pure functions first (tests compare them to naive loops), then DDP-correct Metric classes over them.
All features are projected and L2-normalised before they reach these functions.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


# ---- pure functions -------------------------------------------------------------------------------------
def top1_correct(feats: torch.Tensor, class_feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """feats [N, D], class_feats [C, D], target [N] -> number of rows whose argmax class is the target."""
    pred = (feats @ class_feats.t()).argmax(dim=1)                # [N]
    return (pred == target).sum()


def paired_retrieval_top1(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """a, b: [N, D], row i of a pairs with row i of b. Returns top-1 % (a->b argmax per row, b->a per column).

    Like the released code, a gallery entry repeated elsewhere (same word twice) counts as an error.
    """
    if len(a) == 0:
        return float("nan"), float("nan")
    sim = a @ b.t()                                               # [N, N]
    idx = torch.arange(len(a), device=a.device)
    a2b = (sim.argmax(dim=1) == idx).float().mean().item() * 100.0
    b2a = (sim.argmax(dim=0) == idx).float().mean().item() * 100.0
    return a2b, b2a


# ---- Metrics --------------------------------------------------------------------------------------------
class ZeroShotTop1(Metric):
    """Top-1 accuracy (%) of features against a fixed class matrix (given at update time)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, feats: torch.Tensor, class_feats: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += top1_correct(feats, class_feats, target).float()
        self.total += float(target.numel())

    def compute(self) -> torch.Tensor:
        return 100.0 * self.correct / self.total.clamp_min(1.0)


class PairedRetrieval(Metric):
    """Top-1 paired retrieval (%) in both directions, separately for real (flag 1) and nonsense (flag 0) words.

    Gathers all features (cat states), so the gallery is the whole validation set of each word kind.
    ``compute`` -> {"real/a2b", "real/b2a", "fake/a2b", "fake/b2a"}.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("a", default=[], dist_reduce_fx="cat")
        self.add_state("b", default=[], dist_reduce_fx="cat")
        self.add_state("real", default=[], dist_reduce_fx="cat")

    def update(self, a: torch.Tensor, b: torch.Tensor, real: torch.Tensor) -> None:
        self.a.append(a.detach())
        self.b.append(b.detach())
        self.real.append(real.detach().bool())

    def compute(self) -> dict[str, torch.Tensor]:
        a, b, real = dim_zero_cat(self.a), dim_zero_cat(self.b), dim_zero_cat(self.real).bool()
        out = {}
        for kind, mask in (("real", real), ("fake", ~real)):
            a2b, b2a = paired_retrieval_top1(a[mask], b[mask])
            out[f"{kind}/a2b"] = torch.tensor(a2b)
            out[f"{kind}/b2a"] = torch.tensor(b2a)
        return out
