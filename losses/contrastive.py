"""Contrastive losses of "Disentangling visual and written concepts in CLIP" (Materzynska et al., CVPR 2022).

Reference: shared/reference/disentangle.md sections 3.2-3.5.

* ``symmetric_infonce(a, b, scale=1.0)``: symmetric InfoNCE over in-batch negatives, diagonal positives,
  logits = scale * a b^T with scale 1 (temperature 1, no CLIP logit scale) as in the released code (3.2).
* ``PAIRS``: the six losses L1..L6 by the numbering of the paper's Fig. 4 (3.3), one table, by pair name.
* ``orthogonality_penalty(W) = ||I_k - W W^T||_F`` (Frobenius norm, not squared; W stored as k x d) (3.4).
* ``PRESETS``: loss-weight subsets (3.5). ``learn_to_spell`` = written-word pairs {L3, L4, L5};
  ``forget_to_spell`` = visual-concept pairs {L1, L2, L6} (the figure's colour coding). The review's subsets
  (spell: L1, L3, L4, L5; forget: L1, L2, L5, L6) are kept as ``*_review`` presets because they are UNVERIFIED.
  The signed forms, as the paper states the loss (issue 17 §5): ``learn_to_spell_signed`` = -L1 - L2 - L6 + L3 + L4
  + L5 and ``forget_to_spell_signed`` = L1 + L2 + L6 - L3 - L4 - L5 (+ gamma R(W) via ``reg`` in both); their
  ablations keep L1, L3, L4, L5 (learn: -L1 + L3 + L4 + L5) and L1, L2, L5, L6 (forget: L1 + L2 - L5 + L6) as
  ``*_signed_ablation``. A negative weight *maximises* that InfoNCE term (bounded: cosine logits are capped).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

# loss name -> (element a, element b); elements are keys of a quintuple-feature batch.
PAIRS: dict[str, tuple[str, str]] = {
    "L1": ("x_i", "x_it"),   # natural image <-> image with text            (visual, red)
    "L2": ("x_i", "y_i"),    # natural image <-> class prompt               (visual, red)
    "L3": ("x_t", "x_it"),   # word image <-> image with text               (written, blue)
    "L4": ("x_t", "y_t"),    # word image <-> word string                   (written, blue)
    "L5": ("x_it", "y_t"),   # image with text <-> word string              (written, blue)
    "L6": ("x_it", "y_i"),   # image with text <-> class prompt             (visual, red)
}
# the released code's CLI flag for each loss (train_projections.py), for users coming from it
CODE_FLAGS: dict[str, str] = {
    "L1": "l_im_ti_im_i", "L2": "l_im_i_txt_i", "L3": "l_im_ti_im_t",
    "L4": "l_im_t_txt_t", "L5": "l_im_ti_txt_t", "L6": "l_im_ti_txt_i",
}
PRESETS: dict[str, dict[str, float]] = {
    "learn_to_spell": {"L3": 1.0, "L4": 1.0, "L5": 1.0},
    "forget_to_spell": {"L1": 1.0, "L2": 1.0, "L6": 1.0},
    "learn_to_spell_review": {"L1": 1.0, "L3": 1.0, "L4": 1.0, "L5": 1.0},
    "forget_to_spell_review": {"L1": 1.0, "L2": 1.0, "L5": 1.0, "L6": 1.0},
    "learn_to_spell_signed": {"L1": -1.0, "L2": -1.0, "L3": 1.0, "L4": 1.0, "L5": 1.0, "L6": -1.0},
    "forget_to_spell_signed": {"L1": 1.0, "L2": 1.0, "L3": -1.0, "L4": -1.0, "L5": -1.0, "L6": 1.0},
    "learn_to_spell_signed_ablation": {"L1": -1.0, "L3": 1.0, "L4": 1.0, "L5": 1.0},
    "forget_to_spell_signed_ablation": {"L1": 1.0, "L2": 1.0, "L5": -1.0, "L6": 1.0},
}


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
                      ignore: torch.Tensor | None = None) -> torch.Tensor:
    """a, b: [N, D] (normalised) -> scalar. 0.5 * (CE(s a b^T, arange N) + CE(s b a^T, arange N)).

    ``ignore``: optional bool [N, N]; True off the diagonal removes that pair from the negatives (e.g. two
    samples of the same class whose y_i rows are identical). The released code ignores nothing.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"symmetric_infonce expects two [N, D] tensors of equal shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    logits = scale * a @ b.t()                                    # [N, N]
    if ignore is not None:
        off = ignore & ~torch.eye(len(a), dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(off, float("-inf"))
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def orthogonality_penalty(W: torch.Tensor) -> torch.Tensor:
    """W: [k, d] -> ||I_k - W W^T||_F (not squared)."""
    eye = torch.eye(W.shape[0], device=W.device, dtype=W.dtype)
    return torch.linalg.matrix_norm(eye - W @ W.t(), ord="fro")


def resolve_weights(preset: str | None = None, overrides: Mapping[str, float | None] | None = None
                    ) -> dict[str, float]:
    """Preset name (or None = all zero) + per-loss overrides {"L1": w, ...} -> {"L1".."L6": weight}.

    Weights may be any float, negative included (a sign convention other than the paper's, which uses none).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown loss preset {preset!r}; valid presets: {', '.join(PRESETS)} (or None).")
    weights = {name: 0.0 for name in PAIRS}
    weights.update(PRESETS.get(preset, {}) if preset else {})
    for name, w in (overrides or {}).items():
        if name not in PAIRS:
            raise ValueError(f"Unknown loss {name!r}; valid losses: {', '.join(PAIRS)}")
        if w is not None:
            weights[name] = float(w)
    if not any(weights.values()):
        raise ValueError(f"All six loss weights are zero (preset={preset!r}, overrides={dict(overrides or {})}): "
                         f"nothing to train.")
    return weights


def spelling_objective(feats: Mapping[str, torch.Tensor], weights: Mapping[str, float], W: torch.Tensor,
                       gamma: float = 0.0, scale: float = 1.0, class_id: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """total = sum_j w_j L_j + gamma ||I - W W^T||_F. ``feats``: projected, normalised [N, k] per element.

    ``class_id`` [N] (optional): in losses with y_i, same-class samples are not each other's negatives (their
    y_i rows are identical); None reproduces the released code (false negatives kept, disentangle.md 3.2).

    Returns (total, parts) where parts holds every weighted-in L_j (unweighted) and "reg" (unscaled).
    """
    parts: dict[str, torch.Tensor] = {}
    total = W.new_zeros(())
    same_class = None if class_id is None else class_id.view(-1, 1) == class_id.view(1, -1)   # [N, N]
    for name, w in weights.items():
        if w == 0.0:
            continue
        a, b = PAIRS[name]
        ignore = same_class if "y_i" in (a, b) else None
        parts[name] = symmetric_infonce(feats[a], feats[b], scale, ignore)
        total = total + w * parts[name]
    parts["reg"] = orthogonality_penalty(W)
    if gamma:
        total = total + gamma * parts["reg"]
    return total, parts
