"""The synthetic world: determinism, distinct classes, dataset items, captions, fixed evaluation splits."""
import random

import numpy as np
import pytest
import torch

from xclip.datamodules.synthetic_world import (
    COLOURS,
    SHAPES,
    SyntheticWorldDataModule,
    WorldDataset,
    caption_for,
    render_object,
    shape_mask,
    typographic_split,
    word_split,
    world_vocabulary,
)


def test_shapes_and_colours_are_single_clip_tokens():
    import open_clip

    enc = open_clip.get_tokenizer("ViT-B-32").encoder
    assert len(SHAPES) >= 20 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 6
    for w in list(SHAPES) + list(COLOURS):
        assert w.isalpha() and w.islower() and w + "</w>" in enc, w


def test_render_object_is_deterministic_and_word_keeps_the_object():
    a, box_a = render_object("star", "red", random.Random(3))
    b, box_b = render_object("star", "red", random.Random(3))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and box_a == box_b
    assert a.size == (64, 64) and a.mode == "RGB"
    c, box_c = render_object("star", "red", random.Random(3), word="circle")
    assert box_c == box_a
    diff = np.abs(np.asarray(c, dtype=int) - np.asarray(a, dtype=int)).sum(-1) > 30
    assert diff.sum() > 20                          # the word is visible
    ys, xs = np.nonzero(diff)
    assert box_a[1] <= ys.mean() <= box_a[3]        # ... and drawn over the object's rows
    d, _ = render_object("star", "red", random.Random(4))
    assert not np.array_equal(np.asarray(a), np.asarray(d))


def test_classes_are_drawn_distinctly():
    box = (4, 4, 56, 56)
    masks = {s: np.asarray(shape_mask(s, box, 64)) > 0 for s in SHAPES}
    for s, m in masks.items():
        assert 150 < m.sum() < 64 * 64, s
    for i, s in enumerate(SHAPES):
        for t in SHAPES[i + 1:]:
            iou = (masks[s] & masks[t]).sum() / (masks[s] | masks[t]).sum()
            assert iou < 0.9, (s, t, iou)  # e.g. circle vs flower differ by the petal outline (IoU 0.86)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="Unknown shape"):
        render_object("blob", "red", random.Random(0))
    with pytest.raises(ValueError, match="Unknown colour"):
        render_object("star", "teal", random.Random(0))
    with pytest.raises(ValueError, match="word_share"):
        WorldDataset(word_share=0.8, object_word_share=0.5)
    with pytest.raises(ValueError, match="caption kind"):
        caption_for("scene", random.Random(0))


def test_dataset_items_and_captions():
    ds = WorldDataset(seed=0, length=300, image_size=32)
    assert len(ds) == 300
    kinds = {"object": 0, "word": 0, "object_word": 0}
    for i in range(300):
        it = ds[i]
        assert it["image"].shape == (3, 32, 32) and it["image"].dtype == torch.float32
        kinds[it["kind"]] += 1
        cap = it["caption"]
        if it["kind"] == "object":
            assert f"{it['colour']} {it['shape']}" in cap and it["label"] == SHAPES.index(it["shape"])
        elif it["kind"] == "word":
            assert it["word"] in cap and it["label"] == -1 and it["shape"] == ""
        else:
            assert it["word"] in cap and it["shape"] in cap and it["word"] != it["shape"]
    assert all(40 < n < 200 for n in kinds.values()), kinds
    again = WorldDataset(seed=0, length=300, image_size=32)
    assert torch.equal(again[17]["image"], ds[17]["image"]) and again[17]["caption"] == ds[17]["caption"]
    other = WorldDataset(seed=1, length=300, image_size=32)
    assert not torch.equal(other[17]["image"], ds[17]["image"])
    with pytest.raises(IndexError):
        ds[300]


def test_typographic_split_is_fixed_and_wrong_words():
    s1, s2 = typographic_split(40, seed=5), typographic_split(40, seed=5)
    assert s1.labels == s2.labels and s1.attack_words == s2.attack_words
    assert np.array_equal(np.asarray(s1.attacked[3]), np.asarray(s2.attacked[3]))
    assert sorted(set(s1.labels)) == list(range(len(SHAPES)))
    assert all(SHAPES[l] != w and w in SHAPES for l, w in zip(s1.labels, s1.attack_words))
    assert not np.array_equal(np.asarray(s1.clean[0]), np.asarray(s1.attacked[0]))
    imgs, words = word_split(20, seed=1)
    assert len(set(words)) == 20 and all(w in world_vocabulary() for w in words)
    _, nonsense = word_split(20, seed=1, nonsense=True)
    assert all(3 <= len(w) <= 5 for w in nonsense)


def test_datamodule_batches():
    dm = SyntheticWorldDataModule(seed=0, train_length=64, val_size=8, batch_size=8, image_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["caption"]) == 8
    assert batch["label"].shape == (8,)


def test_reading_options_default_to_the_shipped_world_and_web_captions_name_the_word():
    # defaults == the world the shipped CLIP was trained on: explicit defaults give identical items
    base = WorldDataset(seed=0, length=60, image_size=32)
    explicit = WorldDataset(seed=0, length=60, image_size=32, word_captions="sign", object_word_captions="describe",
                            word_size=(0.28, 0.45), n_fonts=0)
    for i in range(60):
        assert torch.equal(base[i]["image"], explicit[i]["image"]) and base[i]["caption"] == explicit[i]["caption"]
    # web captions: same images (captions are drawn after the image); word images and a share of the objects
    # with a word are captioned by the written word alone, "a {word}." or "a {colour} {word}." (a labelled product)
    web = WorldDataset(seed=0, length=400, image_size=32, word_captions="web", object_word_captions="web",
                       word_only_share=0.5)
    word_only = 0
    for i in range(400):
        b = web.sample(i)
        if i < 60:
            assert np.array_equal(np.asarray(base.sample(i)["image"]), np.asarray(b["image"]))
        if b["kind"] != "object":
            assert b["word"] in b["caption"]
        if b["kind"] == "object_word":
            word_only += b["caption"] in (b["word"], f"{b['word']}.", f"a {b['word']}.", f"a {b['colour']} {b['word']}.")
    assert word_only > 10
    # object_only_share: that share of the objects with a word is captioned as the object alone (text unmentioned);
    # images and the word-only captions stay as with object_only_share=0 (the same single draw decides)
    both = WorldDataset(seed=0, length=400, image_size=32, word_captions="web", object_word_captions="web",
                        word_only_share=0.5, object_only_share=0.3)
    object_only = 0
    for i in range(400):
        a, b = web.sample(i), both.sample(i)
        if i < 40:
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        if b["kind"] != "object_word":
            assert a["caption"] == b["caption"]
            continue
        if a["caption"] in (a["word"], f"{a['word']}.", f"a {a['word']}.", f"a {a['colour']} {a['word']}."):
            assert b["caption"] == a["caption"]
        if b["caption"] in (f"a photo of a {b['colour']} {b['shape']}.", f"a {b['colour']} {b['shape']}."):
            object_only += 1
            assert b["word"] not in b["caption"].split()
    n_object_word = sum(both.sample(i)["kind"] == "object_word" for i in range(400))
    assert 0.15 * n_object_word < object_only < 0.45 * n_object_word
    with pytest.raises(ValueError, match="object_only_share"):
        WorldDataset(object_word_captions="web", word_only_share=0.8, object_only_share=0.3)
    with pytest.raises(ValueError, match="word_captions"):
        WorldDataset(word_captions="tweet")
    with pytest.raises(ValueError, match="word_size"):
        WorldDataset(word_size=(0.5, 0.2))


def test_grid_layout_puts_one_letter_in_each_cell_of_one_row():
    from xclip.datamodules.synthetic_world import GRID_COLUMNS, draw_grid_word, render_background, render_word

    cell = 64 // GRID_COLUMNS
    for seed, word in enumerate(["cat", "pentagon", "xq"]):
        bg = render_background(random.Random(seed), 64)
        img = draw_grid_word(bg, word, random.Random(seed), fill=(0, 0, 0))
        ink = np.abs(np.asarray(img, dtype=int) - np.asarray(bg, dtype=int)).sum(-1) > 60   # [64, 64]
        rows = {y // cell for y in np.nonzero(ink.any(1))[0]}
        assert len(rows) <= 2, rows                       # one row of cells (descenders may touch the next)
        cols = sorted({x // cell for x in np.nonzero(ink.any(0))[0]})
        assert len(cols) == len(word) and cols == list(range(cols[0], cols[0] + len(word))), (word, cols)
        for c in cols:                                    # every cell of the word holds ink
            assert ink[:, c * cell:(c + 1) * cell].sum() > 3, (word, c)
    a, _ = render_word("moon", random.Random(1), 64, text_layout="grid")
    b, _ = render_word("moon", random.Random(1), 64, text_layout="grid")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    long, _ = render_word("abcdefghij", random.Random(1), 64, text_layout="grid")   # > 8 letters: free layout
    assert long.size == (64, 64)
    with pytest.raises(ValueError, match="grid layout holds"):
        draw_grid_word(bg, "abcdefghij", random.Random(0), fill=(0, 0, 0))


def test_grid_layout_changes_only_the_text_and_the_suite_reads_it():
    from xclip.evaluation import world

    free = typographic_split(n=6, seed=5, image_size=64, text_layout="free")
    grid = typographic_split(n=6, seed=5, image_size=64, text_layout="grid")
    assert free.labels == grid.labels and free.attack_words == grid.attack_words
    for i in range(6):
        assert np.array_equal(np.asarray(free.clean[i]), np.asarray(grid.clean[i]))   # objects unchanged
        assert not np.array_equal(np.asarray(free.attacked[i]), np.asarray(grid.attacked[i]))
    assert word_split(5, seed=2, text_layout="free")[1] == word_split(5, seed=2, text_layout="grid")[1]
    ds = WorldDataset(seed=0, length=40, image_size=32, text_layout="grid")
    assert {ds.sample(i)["kind"] for i in range(40)} >= {"word", "object"}
    with pytest.raises(ValueError, match="text_layout"):
        WorldDataset(text_layout="diagonal")
    with pytest.raises(ValueError, match="text_layout"):
        world.check(world.Settings(text_layout="diagonal"))
