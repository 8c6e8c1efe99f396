"""TextSpan tools: chunked store, segmentation maps and metrics (on constructed data)."""
import json
import math
import tracemalloc

import numpy as np
import pytest
import torch

from xclip.analysis.segmentation import (
    SegmentationMetrics,
    average_precision,
    class_heatmaps,
    foreground,
    two_channel_ap,
)
from xclip.analysis.store import ShardedArray, ShardedWriter, get_head_column


# ---- store ---------------------------------------------------------------------------------------------------
def test_store_round_trip_and_slicing(tmp_path):
    data = np.random.default_rng(0).standard_normal((103, 3, 2, 5)).astype(np.float32)
    with ShardedWriter(tmp_path, "heads", item_shape=(3, 2, 5), shard_rows=10) as w:
        for a in range(0, 103, 7):                           # batch size unrelated to the shard size
            w.append(torch.from_numpy(data[a:a + 7]))
    arr = ShardedArray(tmp_path, "heads")
    assert arr.shape == (103, 3, 2, 5) and len(arr.files) == 11
    np.testing.assert_array_equal(arr[:], data)
    np.testing.assert_array_equal(arr[5:37, 1], data[5:37, 1])
    np.testing.assert_array_equal(arr[-1], data[-1])
    np.testing.assert_array_equal(get_head_column(arr, 2, 1).numpy(), data[:, 2, 1])
    with pytest.raises(ValueError, match="expected"):
        ShardedWriter(tmp_path, "x", item_shape=(3,)).append(np.zeros((2, 4)))


def test_store_incomplete_and_resume(tmp_path):
    data = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    w = ShardedWriter(tmp_path, "mlps", item_shape=(4,), shard_rows=8)
    w.append(data[:20])                                      # interrupted: 2 shards on disk, 4 rows buffered
    with pytest.raises(RuntimeError, match="incomplete"):
        ShardedArray(tmp_path, "mlps")
    w2 = ShardedWriter(tmp_path, "mlps", item_shape=(4,), shard_rows=8, resume=True)
    assert w2.rows_done == 16
    w2.append(data[16:])
    w2.close()
    np.testing.assert_array_equal(ShardedArray(tmp_path, "mlps")[:], data)
    assert json.loads((tmp_path / "mlps.json").read_text())["complete"]
    assert not list(tmp_path.glob("*.tmp"))                 # atomic writes leave no temp files
    with pytest.raises(ValueError, match="do not match"):
        ShardedWriter(tmp_path, "mlps", item_shape=(5,), resume=True)


def test_store_memory_stays_bounded(tmp_path):
    item, shard_rows, batch = (8, 4, 64), 64, 32             # 8 KiB a row, 512 KiB a shard
    total_rows = 1024                                        # 8 MiB written in all
    rng = np.random.default_rng(0)
    tracemalloc.start()
    with ShardedWriter(tmp_path, "heads", item_shape=item, shard_rows=shard_rows) as w:
        for _ in range(total_rows // batch):
            w.append(rng.standard_normal((batch, *item)).astype(np.float32))
    _, peak_write = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    arr = ShardedArray(tmp_path, "heads")
    col = get_head_column(arr, 3, 2)                         # [1024, 64] = 256 KiB
    _, peak_read = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert col.shape == (total_rows, 64)
    assert peak_write < 3 * 2 ** 20, peak_write              # a couple of shards, not 8 MiB
    assert peak_read < 2 ** 20, peak_read


# ---- segmentation metrics ------------------------------------------------------------------------------------
def _naive_ap(scores, labels):
    pairs = sorted(zip(scores.tolist(), labels.tolist()), key=lambda p: -p[0])
    n_pos = sum(labels.tolist())
    ap, prev_r = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        sel = [y for s, y in pairs if s >= t]
        p, r = sum(sel) / len(sel), sum(sel) / n_pos
        ap += (r - prev_r) * p
        prev_r = r
    return ap


def test_average_precision_matches_reference():
    assert math.isclose(average_precision(torch.tensor([.9, .8, .7, .6]), torch.tensor([1, 0, 1, 0])), 0.5 + 0.5 * 2 / 3,
                        rel_tol=1e-6)  # torchmetrics returns float32
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = torch.randint(0, 6, (40,), generator=g).float() / 5          # many ties
        y = torch.randint(0, 2, (40,), generator=g)
        assert math.isclose(average_precision(s, y), _naive_ap(s, y), rel_tol=1e-6)
    assert math.isnan(average_precision(torch.rand(5), torch.zeros(5)))


def test_pixel_accuracy_and_iou_on_constructed_masks():
    target = torch.zeros(4, 4, dtype=torch.long)
    target[:2] = 1                                           # top half foreground (8 px)
    pred = torch.zeros(4, 4, dtype=torch.long)
    pred[:3] = 1                                             # 12 px predicted, 8 correct fg + 4 correct bg
    m = SegmentationMetrics()
    m.update(pred[None].float(), target[None].bool())        # a 0/1 map: foreground = above its mean = pred
    out = m.compute()
    assert math.isclose(float(out["pixel_acc"]), 12 / 16)
    assert math.isclose(float(out["miou"]), (4 / 8 + 8 / 12) / 2, rel_tol=1e-6)  # IoU bg 4/8, fg 8/12


def test_segmentation_metrics_perfect_inverted_partial():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 2:6] = True
    m = SegmentationMetrics()
    m.update(mask.float(), mask)
    out = m.compute()
    assert out["pixel_acc"] == 1 and out["miou"] == 1 and out["map"] == 1
    m = SegmentationMetrics()
    m.update((~mask).float(), mask)
    out = m.compute()
    assert out["pixel_acc"] == 0 and out["miou"] == 0 and math.isclose(float(out["map"]), 0.5)  # chance level: every threshold is 50 % precise
    # accumulation over images: a perfect one and an all-background prediction
    m = SegmentationMetrics()
    m.update(mask.float(), mask)
    m.update(torch.zeros(1, 8, 8), mask)                     # constant map: nothing above its mean
    out = m.compute()
    assert math.isclose(float(out["pixel_acc"]), (64 + 48) / 128)
    inter, union = np.array([48 + 48, 16]), np.array([48 + 64, 32])
    assert math.isclose(float(out["miou"]), float((inter / union).mean()), rel_tol=1e-6)
    assert math.isclose(two_channel_ap(mask[0].float(), mask[0]), 1.0)


def test_class_heatmap_finds_planted_patches():
    B, L, g, D, C = 2, 3, 4, 8, 5
    classifier = torch.eye(D)[:, :C]                         # class c = direction c
    tokens = 0.01 * torch.randn(B, L, 1 + g * g, D)
    fg = torch.zeros(B, g, g, dtype=torch.bool)
    fg[0, :2, :2] = True
    fg[1, 1:, 3] = True
    cls = torch.tensor([1, 3])
    for b in range(B):
        idx = 1 + torch.nonzero(fg[b].flatten()).flatten()
        tokens[b, -1, idx, cls[b]] += 1.0                   # last layer writes the class on the object patches
    maps = class_heatmaps(tokens, classifier, cls)           # [B, g, g]
    assert maps.shape == (B, g, g) and maps.min() >= 0 and math.isclose(float(maps.max()), 1.0, rel_tol=1e-6)
    assert torch.equal(foreground(maps), fg)
    up = class_heatmaps(tokens, classifier, cls, out_size=16)
    assert up.shape == (B, 16, 16)
