"""Few-shot split manifests (CoOp protocol) on a generated image folder."""
import json

import pytest
import torch
from coop_data import make_colour_folder

from xclip.datamodules.fewshot import FewShotDataError, FewShotDataModule, read_classnames, resolve_fewshot


@pytest.fixture
def folder(tmp_path):
    return make_colour_folder(tmp_path / "colours", n_train=6, n_test=3)


def _dm(folder, tmp_path, **kw):
    args = dict(dataset=f"imagefolder:{folder}", shots=2, seed=1, data_dir=str(tmp_path / "data"), image_size=32,
                batch_size=4, num_workers=0)
    args.update(kw)
    return FewShotDataModule(**args)


def test_split_is_k_shot_deterministic_and_reused(folder, tmp_path):
    d1 = resolve_fewshot(f"imagefolder:{folder}", 2, 1, str(tmp_path / "data"))
    man = d1.manifest
    assert set(man["train"]) == {"blue", "green", "red", "yellow"}
    assert all(len(v) == 2 for v in man["train"].values())
    assert all(len(v) == 2 for v in man["val"].values())  # min(K, 4); from train leftovers (no val/)
    assert all(not set(man["val"][k]) & set(man["train"][k]) for k in man["train"])
    files = list((tmp_path / "data").rglob("shot_2-seed_1.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    d2 = resolve_fewshot(f"imagefolder:{folder}", 2, 1, str(tmp_path / "data"))
    assert d2.manifest == man and files[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    other = resolve_fewshot(f"imagefolder:{folder}", 2, 2, str(tmp_path / "data2")).manifest
    assert other["train"] != man["train"]  # another seed, another split (6 choose 2 per class)
    again = resolve_fewshot(f"imagefolder:{folder}", 2, 1, str(tmp_path / "data3")).manifest
    assert again["train"] == man["train"]  # same seed -> same sample, independent of the cache


def test_datamodule_loaders_and_val_from_val_split(tmp_path):
    root = make_colour_folder(tmp_path / "c", n_train=5, n_test=3, with_val=True)
    dm = _dm(root, tmp_path, shots=4)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.data.manifest["val_split"] == "val"
    assert len(dm.train_set) == 16 and len(dm.val_set) == 16 and len(dm.test_set) == 12
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    assert dm.classnames == ["blue", "green", "red", "yellow"]


def test_shots_larger_than_smallest_class_names_it(folder, tmp_path):
    for p in sorted((folder / "train" / "green").iterdir())[3:]:
        p.unlink()
    with pytest.raises(FewShotDataError, match=r"shots=4.*'green'.*only 3"):
        resolve_fewshot(f"imagefolder:{folder}", 4, 1, str(tmp_path / "data"))
    d = resolve_fewshot(f"imagefolder:{folder}", 4, 1, str(tmp_path / "data"), allow_fewer=True)
    assert len(d.manifest["train"]["green"]) == 3


def test_classnames_file_formats_and_count_mismatch(folder, tmp_path):
    keys = ["blue", "green", "red", "yellow"]
    plain = tmp_path / "names.txt"
    plain.write_text("navy blue\ngrass green\nfire red\nlemon yellow\n")
    assert read_classnames(plain, keys)[0] == "navy blue"
    coop = tmp_path / "coop_names.txt"  # CoOp/ImageNet format: "<folder> <name>", any order
    coop.write_text("red fire red\nblue navy blue\nyellow lemon\ngreen grass\n")
    assert read_classnames(coop, keys) == ["navy blue", "grass", "fire red", "lemon"]
    wnid = tmp_path / "wnid.txt"
    wnid.write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\nn01491361 tiger shark\n")
    assert read_classnames(wnid, keys)[2] == "great white shark"
    bad = tmp_path / "three.txt"
    bad.write_text("a\nb\nc\n")
    with pytest.raises(FewShotDataError, match=r"three.txt has 3 names but the dataset has 4 classes"):
        resolve_fewshot(f"imagefolder:{folder}", 1, 1, str(tmp_path / "data"), classnames_file=str(bad))


def test_manifest_that_does_not_match_dataset_fails(folder, tmp_path):
    d = resolve_fewshot(f"imagefolder:{folder}", 2, 1, str(tmp_path / "data"))
    path = next((tmp_path / "data").rglob("shot_2-seed_1.json"))
    man = json.loads(path.read_text())
    man["train"]["red"][0] = "train/red/999.png"
    path.write_text(json.dumps(man))
    with pytest.raises(FewShotDataError, match=r"shot_2-seed_1.json does not match.*999.png"):
        resolve_fewshot(f"imagefolder:{folder}", 2, 1, str(tmp_path / "data"))
    man = d.manifest | {"source": d.manifest["source"] | {"class_keys": ["a", "b"]}}
    path.write_text(json.dumps(man))
    with pytest.raises(FewShotDataError, match=r"does not match the dataset: 2 classes"):
        resolve_fewshot(f"imagefolder:{folder}", 2, 1, str(tmp_path / "data"))


def test_unknown_dataset_offline_fails_clearly(tmp_path):
    with pytest.raises(FewShotDataError, match=r"no-such-org/no-such-dataset.*HF_DATASETS_OFFLINE"):
        resolve_fewshot("no-such-org/no-such-dataset", 1, 1, str(tmp_path / "data"), cache_dir=str(tmp_path / "hf"))
    with pytest.raises(FewShotDataError, match="not found"):
        resolve_fewshot("/no/such/folder", 1, 1, str(tmp_path / "data"))


def test_corrupt_images_counted_reported_and_threshold(folder, tmp_path):
    bad = folder / "test" / "red" / "001.png"
    bad.write_bytes(b"not an image")
    dm = _dm(folder, tmp_path, max_bad_fraction=0.1)
    dm.setup("test")
    assert len(dm.test_set) == 11 and [b["path"] for b in dm.bad_images["test"]] == [str(bad)]
    (folder / "test" / "red" / "002.png").write_bytes(b"\x89PNG truncated")
    dm = _dm(folder, tmp_path, max_bad_fraction=0.1)
    with pytest.raises(FewShotDataError, match=r"2 of 12 images.*unreadable.*002.png"):
        dm.setup("test")


def test_hf_dataset_source_skips_unlabelled_test_split(tmp_path, monkeypatch):
    """An HF `datasets` source (local parquet files, as the hub's imagenet-1k layout): ClassLabel names, K shots,
    and a `test` split holding label -1 only is skipped, so the test split is `validation` (ImageNet val)."""
    datasets = pytest.importorskip("datasets")
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["red_thing", "blue_thing", "green_thing"])})
    rng = np.random.default_rng(0)
    root = tmp_path / "hfds" / "data"
    root.mkdir(parents=True)
    for split, n, labelled in (("train", 9, True), ("validation", 6, True), ("test", 3, False)):
        imgs = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
        ds = datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 if labelled else -1 for i in range(n)]},
                                        features=feats)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    dm = FewShotDataModule(f"hf:{tmp_path / 'hfds'}", shots=2, seed=1, data_dir=str(tmp_path / "data"),
                           image_size=32, batch_size=4, num_workers=0, cache_dir=str(tmp_path / "hf"))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.classnames == ["red thing", "blue thing", "green thing"]
    assert dm.data.test_split == "validation" and dm.data.manifest["val_split"] == "train"
    assert {k: len(v) for k, v in dm.data.manifest["train"].items()} == {"red_thing": 2, "blue_thing": 2,
                                                                         "green_thing": 2}
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3 and len(dm.test_set) == 6
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 1, 2, 0, 1, 2]


def test_dassl_sampler_on_image_folder_and_manifests_record_their_sampler(folder, tmp_path):
    """fewshot_sampler='dassl' == Dassl's procedure (seeded global random, groups in first-appearance order,
    random.sample per group, then min(K, 4) val shots from the same RNG) over the folder's sorted listing."""
    import random

    dm = _dm(folder, tmp_path, shots=3, seed=2, fewshot_sampler="dassl")
    man = dm.data.manifest
    assert man["sampler"] == "dassl"
    random.seed(2)
    keys = sorted(p.name for p in (folder / "train").iterdir())
    ref = {k: sorted(random.sample([f"train/{k}/{p.name}" for p in sorted((folder / "train" / k).iterdir())], 3))
           for k in keys}
    assert man["train"] == ref
    rest = {k: [f"train/{k}/{p.name}" for p in sorted((folder / "train" / k).iterdir())
                if f"train/{k}/{p.name}" not in ref[k]] for k in keys}
    assert man["val"] == {k: sorted(random.sample(rest[k], 3)) for k in keys}  # no val/: held-out train images
    assert list((tmp_path / "data").rglob("shot_3-seed_2-dassl.json"))
    # an old manifest (no sampler key) is the project sampler's; asking for dassl at its path is an error
    xman = _dm(folder, tmp_path, shots=3, seed=2).data.manifest
    assert xman["sampler"] == "xclip"
    path = next((tmp_path / "data").rglob("shot_3-seed_2-dassl.json"))
    path.write_text(json.dumps({k: v for k, v in xman.items() if k != "sampler"}))
    with pytest.raises(FewShotDataError, match="picked by sampler 'xclip', expected 'dassl'"):
        _dm(folder, tmp_path, shots=3, seed=2, fewshot_sampler="dassl").data


def _coop_imagenet_picks(root, shots: int, seed: int, listdir) -> dict:
    """CoOp's ImageNet train list + Dassl's generate_fewshot_dataset, as CoOp runs them (ntlb_coop.md): class
    folders sorted, a class's images in ``listdir`` order minus names starting with '.', groups by label in order of
    first appearance, ``random.seed(seed)`` then ``random.sample(group, K)``."""
    import random

    folders = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    groups = {f: [f"train/{f}/{n}" for n in listdir(root / "train" / f) if not n.startswith(".")] for f in folders}
    random.seed(seed)
    return {f: sorted(random.sample(ids, shots)) for f, ids in groups.items()}


def test_image_folder_order_is_sorted_whatever_the_listing_order_and_coops_where_listdir_sorts(folder, tmp_path,
                                                                                              monkeypatch):
    """Our listing does not depend on the file system's order (the picks are the same on every machine); CoOp's
    ImageNet picks do, and equal ours exactly where os.listdir returns sorted names (module doc)."""
    import os
    import pathlib

    (folder / "train" / "red" / "._000.png").write_bytes(b"AppleDouble")   # a hidden file: skipped, as Dassl does
    picks = _dm(folder, tmp_path / "a", shots=3, seed=2, fewshot_sampler="dassl").data.manifest["train"]
    assert picks == _coop_imagenet_picks(folder, 3, 2, lambda d: sorted(os.listdir(d)))
    assert not any(f.split("/")[-1].startswith(".") for ids in picks.values() for f in ids)

    real_iterdir = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(sorted(real_iterdir(self), reverse=True)))
    again = _dm(folder, tmp_path / "b", shots=3, seed=2, fewshot_sampler="dassl").data.manifest["train"]
    assert again == picks                                    # a reversed listing: the same picks
    monkeypatch.undo()
    reversed_coop = _coop_imagenet_picks(folder, 3, 2, lambda d: sorted(os.listdir(d), reverse=True))
    assert reversed_coop != picks                            # CoOp's picks follow the listing order
