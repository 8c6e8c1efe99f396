"""Zero-shot classification metrics: lexicon-restricted top-1 (CLIP-as-OCR) and typographic-attack accuracy."""
from __future__ import annotations

import torch
from torchmetrics import Metric


def masked_top1(scores: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """scores [N, V], allowed [N, V] bool (None = all) -> predicted index [N] (argmax over allowed entries).

    Rows with no allowed entry predict -1.
    """
    if allowed is None:
        return scores.argmax(dim=1)
    if allowed.shape != scores.shape:
        raise ValueError(f"masked_top1: allowed {tuple(allowed.shape)} must match scores {tuple(scores.shape)}")
    pred = scores.masked_fill(~allowed, float("-inf")).argmax(dim=1)  # [N]
    return torch.where(allowed.any(dim=1), pred, torch.full_like(pred, -1))


class LexiconAccuracy(Metric):
    """Top-1 accuracy of argmax over (optionally per-sample restricted) candidates: IIIT5K with 50/1k lexicons."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
        """scores [N, V], target [N] (index into V; -1 = ground truth not among the candidates), allowed [N, V]."""
        pred = masked_top1(scores, allowed)
        self.correct += ((pred == target.to(pred.device)) & (target.to(pred.device) >= 0)).sum().to(self.correct)
        self.total += scores.shape[0]

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


def typographic_counts(scores: torch.Tensor, true_idx: torch.Tensor, attack_idx: torch.Tensor) -> torch.Tensor:
    """scores [N, C] over the candidate set (true objects U attack words); true_idx [N]; attack_idx [N] (-1 = clean).

    -> counts [5] (long): clean correct, clean total, attacked correct, attacked total, attacked predicted-as-attack.
    """
    if scores.dim() != 2 or len(true_idx) != len(scores) or len(attack_idx) != len(scores):
        raise ValueError(f"typographic_counts: scores [N, C] with N={len(true_idx)} expected, "
                         f"got {tuple(scores.shape)} and attack_idx of {len(attack_idx)}")
    pred = scores.argmax(dim=1)  # [N]
    true_idx, attack_idx = true_idx.to(pred.device), attack_idx.to(pred.device)
    clean, attacked = attack_idx < 0, attack_idx >= 0
    correct = pred == true_idx
    return torch.stack([(correct & clean).sum(), clean.sum(), (correct & attacked).sum(), attacked.sum(),
                        ((pred == attack_idx) & attacked).sum()]).long()


class TypographicAttackAccuracy(Metric):
    """Accuracy on clean and attacked images, and the attack success rate (prediction == the written word).

    ``accuracy`` is over every image seen (the real 180-image set mixes clean and attacked photos).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(5, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, true_idx: torch.Tensor, attack_idx: torch.Tensor) -> None:
        self.counts += typographic_counts(scores, true_idx, attack_idx).to(self.counts.device)

    def compute(self) -> dict[str, torch.Tensor]:
        cc, ct, ac, at, asr = self.counts.float()
        nan = torch.tensor(float("nan"))
        return {
            "clean_accuracy": cc / ct if ct > 0 else nan,
            "attacked_accuracy": ac / at if at > 0 else nan,
            "attack_success_rate": asr / at if at > 0 else nan,
            "accuracy": (cc + ac) / (ct + at) if ct + at > 0 else nan,
            "n_clean": ct, "n_attacked": at,
        }
