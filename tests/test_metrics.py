"""Metric cores against naive references, known values, and state merging (the DDP reduction)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from xclip.metrics.classification import LexiconAccuracy, TypographicAttackAccuracy, masked_top1
from xclip.metrics.detection import box_ap_metric, summarize_map
from xclip.metrics.retrieval import RetrievalRecall, bidirectional_recall, retrieval_hits
from xclip.metrics.saliency import OtsuPRF, boxes_to_masks, mask_prf, otsu_threshold
from xclip.metrics.text_in_image import TextDetectionRate


# ---- retrieval ------------------------------------------------------------------------------------------
def naive_hits(sim, qk, gk, ks):
    out = []
    for k in ks:
        hits = 0
        for q in range(sim.shape[0]):
            rel = [g for g in range(sim.shape[1]) if gk[g] == qk[q]]
            if not rel:
                continue
            best = max(float(sim[q, g]) for g in rel)
            worse_or_tied = sum(1 for g in range(sim.shape[1]) if gk[g] != qk[q] and float(sim[q, g]) >= best)
            hits += worse_or_tied < k
        out.append(hits)
    return out


def test_retrieval_hits_match_naive_reference():
    g = torch.Generator().manual_seed(1)
    sim = torch.randint(0, 5, (30, 25), generator=g).float()  # many ties
    qk, gk = torch.randint(0, 12, (30,), generator=g), torch.randint(0, 12, (25,), generator=g)
    assert retrieval_hits(sim, qk, gk, (1, 3, 5)).tolist() == naive_hits(sim, qk.tolist(), gk.tolist(), (1, 3, 5))


def test_retrieval_perfect_known_mix_and_duplicates():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert bidirectional_recall(x, x) == {f"{d}_top{k}": 1.0 for d in ("a2b", "b2a") for k in (1, 5)}
    # query 0 -> item 1 best, item 0 second: top1 miss, top5 hit; others perfect -> top1 = 3/4
    sim = torch.eye(4)
    sim[0, 1] = 2.0
    m = RetrievalRecall((1, 5))
    m.update(sim)
    assert {k: float(v) for k, v in m.compute().items()} == {"top1": 0.75, "top5": 1.0}
    # a repeated word: identical gallery rows tie -> an error with distinct keys, a hit with shared keys
    y = x.clone()
    y[1] = y[0]
    strict = bidirectional_recall(y, y)
    shared = bidirectional_recall(y, y, keys=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    assert strict["a2b_top1"] == 6 / 8 and shared["a2b_top1"] == 1.0


def test_retrieval_state_merge_equals_single_pass():
    sim = torch.randn(20, 20)
    full, a, b = RetrievalRecall(), RetrievalRecall(), RetrievalRecall()
    keys = torch.arange(20)
    full.update(sim, keys, keys)
    a.update(sim[:7], keys[:7], keys)
    b.update(sim[7:], keys[7:], keys)
    a.merge_state(b)
    assert {k: float(v) for k, v in a.compute().items()} == {k: float(v) for k, v in full.compute().items()}


# ---- classification -------------------------------------------------------------------------------------
def test_lexicon_accuracy_masked_and_known_value():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.3, 0.2, 0.1]])
    allowed = torch.tensor([[False, True, True], [True, True, True], [False, False, False]])
    assert masked_top1(scores, allowed).tolist() == [2, 1, -1]
    m = LexiconAccuracy()
    m.update(scores, torch.tensor([2, 0, 0]), allowed)  # right, wrong, no candidate
    assert float(m.compute()) == pytest.approx(1 / 3)
    naive = sum(int(max((j for j in range(3) if allowed[i, j]), key=lambda j: scores[i, j], default=-1) == t)
                for i, t in enumerate([2, 0, 0]))
    assert naive == 1


def test_typographic_accuracy_known_values_and_merge():
    # candidates 0..3; rows: clean right, clean wrong, attacked right, attacked -> attack word, attacked other
    scores = torch.tensor([[5., 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [0, 0, 0, 5], [5., 0, 0, 0]])
    true = torch.tensor([0, 0, 2, 1, 3])
    attack = torch.tensor([-1, -1, 3, 3, 2])
    m = TypographicAttackAccuracy()
    m.update(scores, true, attack)
    r = {k: float(v) for k, v in m.compute().items()}
    assert r["clean_accuracy"] == 0.5 and r["attacked_accuracy"] == pytest.approx(1 / 3)
    assert r["attack_success_rate"] == pytest.approx(1 / 3) and r["accuracy"] == pytest.approx(2 / 5)
    a, b = TypographicAttackAccuracy(), TypographicAttackAccuracy()
    a.update(scores[:2], true[:2], attack[:2])
    b.update(scores[2:], true[2:], attack[2:])
    a.merge_state(b)
    assert {k: float(v) for k, v in a.compute().items()} == r


# ---- saliency / Otsu ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_otsu_matches_skimage(dtype):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(24, 14, 14, generator=g, dtype=torch.float64) ** 3
    maps[3] = torch.randn(14, 14, generator=g, dtype=torch.float64)
    maps[4, :, :7] += 5.0  # bimodal
    maps = maps.to(dtype)
    ref = torch.tensor([float(threshold_otsu(m.numpy())) for m in maps], dtype=torch.float64)
    tol = 0 if dtype == torch.float64 else 1e-5
    assert torch.allclose(otsu_threshold(maps), ref, atol=tol, rtol=0)
    const = torch.full((1, 5, 5), 0.3, dtype=torch.float64)
    assert float(otsu_threshold(const)) == pytest.approx(0.3)


def test_boxes_to_masks_and_prf_naive():
    m = boxes_to_masks(torch.tensor([[1.0, 2.0, 4.0, 3.0]]), 5, 6)
    assert m.sum() == 3 and m[0, 2, 1:4].all()
    g = torch.Generator().manual_seed(3)
    pred, tgt = torch.rand(6, 8, 8, generator=g) > 0.5, torch.rand(6, 8, 8, generator=g) > 0.6
    pred[0] = False
    out = mask_prf(pred, tgt)
    for i in range(6):
        inter = int((pred[i] & tgt[i]).sum())
        p = inter / int(pred[i].sum()) if pred[i].any() else 0.0
        r = inter / int(tgt[i].sum())
        f = 2 * p * r / (p + r) if p + r else 0.0
        assert out[i].tolist() == pytest.approx([p, r, f])


def test_otsu_prf_perfect_and_known_mix():
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 4.0, 8.0]])
    masks = boxes_to_masks(boxes, 8, 8)
    m = OtsuPRF()
    m.update(masks.float() * 0.9 + 0.05, masks)  # maps = the box -> P = R = F1 = 1
    assert {k: float(v) for k, v in m.compute().items()} == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # map covering the left half (32 px) vs box 2..6 x 2..6 (16 px, 8 of them in the left half):
    left = torch.zeros(1, 8, 8)
    left[0, :, :4] = 1.0
    m2 = OtsuPRF()
    m2.update(left, masks[:1])
    r = {k: float(v) for k, v in m2.compute().items()}
    assert r["precision"] == pytest.approx(8 / 32) and r["recall"] == pytest.approx(8 / 16)
    assert r["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)


# ---- text-in-image / detection --------------------------------------------------------------------------
def test_text_detection_rate():
    m = TextDetectionRate((0.0, 0.25))
    m.update(torch.tensor([-1.0, 0.1, 0.9, 0.0]))
    assert {k: float(v) for k, v in m.compute().items()} == {"rate@0": 0.5, "rate@0.25": 0.25}


def test_box_ap_toy_example_and_perfect():
    """environment.md 5: one exact class-1 box, one class-0 box at IoU ~0.78 -> AP 0.8, AP50 = AP75 = 1."""
    preds = [{"boxes": torch.tensor([[258.0, 41, 606, 285], [10, 10, 100, 100]]), "scores": torch.tensor([0.9, 0.8]),
              "labels": torch.tensor([0, 1])}]
    target = [{"boxes": torch.tensor([[214.0, 41, 562, 285], [10, 10, 100, 100]]), "labels": torch.tensor([0, 1])}]
    m = box_ap_metric(class_metrics=True)
    m.update(preds, target)
    r = summarize_map(m.compute(), ["a", "b"])
    assert r["AP"] == pytest.approx(0.8) and r["AP50"] == 1.0 and r["AP75"] == 1.0
    assert r["AR1"] == pytest.approx(0.8) and r["AP_per_class"] == pytest.approx({"a": 0.6, "b": 1.0})
    # hand check of the 0.6: IoU = 304*244 / (392*244) = 0.7755 -> matched at IoU 0.50..0.75 (6 of 10 thresholds)
    iou = (562 - 258) / (606 - 214)
    assert sum(t <= iou for t in np.linspace(0.5, 0.95, 10)) == 6
    m2 = box_ap_metric()
    m2.update([{**target[0], "scores": torch.tensor([0.5, 0.5])}], target)
    assert summarize_map(m2.compute())["AP"] == 1.0
