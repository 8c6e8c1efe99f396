"""Few-shot image classification splits (CoOp protocol) for any HF `datasets` name or local image folder.

    dm = FewShotDataModule("imagefolder:/data/imagenet", shots=16, seed=1, data_dir="data",
                           classnames_file="/data/imagenet/classnames.txt")

Protocol (spec §2.3):
- K shots per class (K in 1/2/4/8/16, seeds 1/2/3) sampled without replacement from the train split with a
  per-seed RNG; a class with fewer than K images is an error naming the class (``allow_fewer=True`` takes all
  of them, as Dassl does).
- Validation: min(K, 4) shots per class from a separate validation split when the dataset has one, otherwise
  from the train images not picked as shots (deviation: ImageNet's val==test would leak the test set).
- Test: the full test split (an imagefolder's ``test/`` or, failing that, ``val/``; an HF dataset's
  ``test_split``).
- ``fewshot_sampler``: ``xclip`` (default; one ``random.Random(seed)`` for train then val, classes in label order)
  or ``dassl``: exactly CoOp's picks for the same seed, i.e. Dassl's ``generate_fewshot_dataset`` after
  ``set_random_seed(S)``: the train items in the order the dataset lists them, grouped by label in order of first
  appearance (``split_dataset_by_label``, a defaultdict), ``random.sample(items, K)`` per group (all of them when a
  group has fewer), then the same RNG for ``min(K, 4)`` val shots per group of the val list.  For the ten
  fine-grained datasets CoOp's order is that of its split file (``split_zhou_*.json``, see
  datamodules/coop_datasets.py), so the picks are CoOp's on any machine.
- The order of an image folder (``ImageFolderSource``; CoOp reads ImageNet this way) is deterministic: class
  folders sorted by name, and in each class the image files (by suffix, names starting with ``.`` skipped)
  sorted by name (code-point order). CoOp's ``ImageNet.read_data`` sorts the class folders too, but lists a
  class's images with Dassl's ``listdir_nohidden``: ``os.listdir`` order, unsorted (on ext4 a hash order that
  differs between machines), names starting with ``.`` skipped, no suffix filter. So ``dassl`` on an image
  folder gives exactly CoOp's ImageNet picks where ``os.listdir`` returns every class folder sorted and the folder
  holds only images; elsewhere CoOp's own picks differ from machine to machine, ours do not.
- The split is a JSON manifest ``{data_dir}/fewshot_splits/{dataset}/shot_{K}-seed_{S}.json`` (``...-dassl.json``
  for the dassl sampler) holding the file ids per class; it is written once (atomically) and reused. A manifest
  that does not match the dataset (other classes, missing files, wrong labels, another sampler) fails with an
  error naming the file.
- Corrupt/unreadable images of the used splits are counted, reported with their paths, dropped, and the run
  fails when more than ``max_bad_fraction`` of a split is bad.

Local image folders: ``ROOT/train/<class>/*.jpg``, ``ROOT/test/<class>/...`` and/or ``ROOT/val/<class>/...``.
CoOp's dataset folders: ``coop:<Dataset>:<root>`` (e.g. ``coop:OxfordPets:/data``; datamodules/coop_datasets.py).
HF datasets: ``hf:NAME`` or a bare hub name (e.g. ``hf:imagenet-1k``; offline only when cached) or ``hf:/local/dir``
of data files (``train-*.parquet``...); the first Image and ClassLabel columns are used. A split without labels
(imagenet-1k's ``test``) is never the test split, so ImageNet tests on ``validation``.
Class names come from the dataset (folder names with ``_`` -> space, or the HF ClassLabel names) or from a text
file: one name per line in class order, or CoOp's ``<folder/wnid> <name>`` lines (mapped by key when the keys
are the dataset's class folders, else by order).
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import open_clip
import pytorch_lightning as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from xclip.datamodules.resumable import ResumableLoader, is_distributed
from xclip.utils.images import list_images
from xclip.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

OPENAI_MEAN: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_MEAN)
OPENAI_STD: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_STD)
MANIFEST_FORMAT = 1
FewShotSampler = Literal["xclip", "dassl"]


class FewShotDataError(ValueError):
    """Bad dataset / split / class-name input; the message names the file, key or value."""


# ---- data sources -----------------------------------------------------------------------------------------
Item = tuple[str, int]  # (file id, label)


class ImageFolderSource:
    """``ROOT/{train,val,test}/<class>/<image>``; file ids are paths relative to ROOT."""

    kind = "imagefolder"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not (self.root / "train").is_dir():
            raise FewShotDataError(f"Image folder {self.root} has no 'train/' subfolder "
                                   f"(expected ROOT/train/<class>/<image>, ROOT/test/<class>/...).")
        self.class_keys = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        if not self.class_keys:
            raise FewShotDataError(f"{self.root / 'train'} has no class subfolders.")
        self._index = {k: i for i, k in enumerate(self.class_keys)}
        self._items: dict[str, list[Item]] = {}
        self.splits = [s for s in ("train", "val", "test") if (self.root / s).is_dir()]
        for split in self.splits:
            extra = sorted(d.name for d in (self.root / split).iterdir() if d.is_dir() and d.name not in self._index)
            if extra:
                raise FewShotDataError(f"{self.root / split} has class folders absent from train/: {extra[:5]}")

    @property
    def default_names(self) -> list[str]:
        return [k.replace("_", " ") for k in self.class_keys]

    def items(self, split: str) -> list[Item]:
        if split not in self._items:
            out = []
            for key in self.class_keys:
                folder = self.root / split / key
                if folder.is_dir():  # sorted by name; hidden names skipped, as Dassl's listdir_nohidden
                    out += [(f"{split}/{key}/{p.name}", self._index[key]) for p in list_images(folder)
                            if not p.name.startswith(".")]
            self._items[split] = out
        return self._items[split]

    def label_of(self, split: str, file_id: str) -> int | None:
        parts = file_id.split("/")
        if len(parts) != 3 or parts[0] != split or not (self.root / file_id).is_file():
            return None
        return self._index.get(parts[1])

    def describe(self, split: str, file_id: str) -> str:
        return str(self.root / file_id)

    def open(self, split: str, file_id: str) -> Image.Image:
        return Image.open(self.root / file_id)

    def identity(self) -> dict:
        return {"kind": self.kind, "root": str(self.root.resolve()), "class_keys": self.class_keys}


class HFSource:
    """A Hugging Face `datasets` image classification set; file ids are row indices of a split."""

    kind = "hf"

    def __init__(self, name: str, config: str | None = None, cache_dir: str | None = None):
        import datasets

        self.name, self.config = name, config
        try:
            self.dsets = datasets.load_dataset(name, config, cache_dir=cache_dir)
        except Exception as e:  # offline + not cached, typo, gated...
            raise FewShotDataError(
                f"Could not load dataset {name!r} (config {config!r}) with `datasets`: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}. Offline (HF_DATASETS_OFFLINE=1) only datasets "
                f"already in the HF cache load; or give a local folder as 'imagefolder:/path' "
                f"(ROOT/train/<class>/*.jpg, ROOT/test/<class>/...).") from e
        self.splits = list(self.dsets.keys())
        if "train" not in self.splits:
            raise FewShotDataError(f"Dataset {name!r} has no 'train' split (splits: {self.splits}).")
        feats = self.dsets["train"].features
        self.image_col = next((k for k, f in feats.items() if type(f).__name__ == "Image"), None)
        self.label_col = next((k for k, f in feats.items() if type(f).__name__ == "ClassLabel"), None)
        if self.image_col is None or self.label_col is None:
            raise FewShotDataError(f"Dataset {name!r} needs an Image column and a ClassLabel column; "
                                   f"features are {dict(feats)}.")
        self.class_keys = list(feats[self.label_col].names)
        self._labels: dict[str, list[int]] = {}

    @property
    def default_names(self) -> list[str]:
        return [k.replace("_", " ") for k in self.class_keys]

    def _split_labels(self, split: str) -> list[int]:
        if split not in self._labels:
            self._labels[split] = [int(v) for v in self.dsets[split][self.label_col]]
        return self._labels[split]

    def items(self, split: str) -> list[Item]:
        return [(str(i), y) for i, y in enumerate(self._split_labels(split)) if y >= 0]

    def label_of(self, split: str, file_id: str) -> int | None:
        labels = self._split_labels(split)
        return labels[int(file_id)] if file_id.isdigit() and int(file_id) < len(labels) else None

    def describe(self, split: str, file_id: str) -> str:
        return f"{self.name}[{split}][{file_id}]"

    def open(self, split: str, file_id: str) -> Image.Image:
        img = self.dsets[split][int(file_id)][self.image_col]
        if isinstance(img, Image.Image):
            return img
        raise OSError(f"row is not a decodable image: {type(img).__name__}")

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "config": self.config, "class_keys": self.class_keys}


def open_source(dataset: str, hf_config: str | None = None, cache_dir: str | None = None):
    """'imagefolder:/path' or an existing folder -> ImageFolderSource; 'hf:NAME' (a hub name or a local folder of
    HF data files, e.g. train-*.parquet) or any other name -> an HF `datasets` source."""
    if dataset.startswith("coop:"):
        from xclip.datamodules.coop_datasets import CoOpSplitSource

        name, sep, root = dataset[len("coop:"):].partition(":")
        if not sep:
            raise FewShotDataError(f"{dataset!r}: write coop:<Dataset>:<root>, e.g. coop:OxfordPets:/data.")
        return CoOpSplitSource(name, root)
    if dataset.startswith("imagefolder:"):
        return ImageFolderSource(dataset[len("imagefolder:"):])
    if dataset.startswith("hf:"):
        return HFSource(dataset[len("hf:"):], hf_config, cache_dir)
    if Path(dataset).expanduser().is_dir():
        return ImageFolderSource(dataset)
    if dataset.startswith(("/", "./", "~")):
        raise FewShotDataError(f"Dataset folder not found: {dataset!r}.")
    return HFSource(dataset, hf_config, cache_dir)


# ---- class names --------------------------------------------------------------------------------------------
_WNID = re.compile(r"^n\d{8}\s+")


def read_classnames(path: str | Path, class_keys: Sequence[str]) -> list[str]:
    """Class names from a text file, in the dataset's class order (see module doc for the formats)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FewShotDataError(f"Class-name file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keyed = [ln.split(maxsplit=1) for ln in lines]
    if all(len(k) == 2 for k in keyed) and {k[0] for k in keyed} == set(class_keys) and len(keyed) == len(class_keys):
        table = {k: v.strip() for k, v in keyed}
        return [table[k] for k in class_keys]
    if len(lines) != len(class_keys):
        raise FewShotDataError(f"Class-name file {path} has {len(lines)} names but the dataset has "
                               f"{len(class_keys)} classes (first dataset classes: {list(class_keys[:3])}).")
    return [_WNID.sub("", ln) for ln in lines]


# ---- split manifests ---------------------------------------------------------------------------------------
def dataset_slug(dataset: str, hf_config: str | None = None) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.rstrip("/").split("/")[-1] or "dataset").strip("_")
    digest = hashlib.sha1(f"{dataset}|{hf_config}".encode()).hexdigest()[:8]
    return f"{base}-{digest}"


def _groups_by_first_appearance(items: Sequence[Item]) -> dict[int, list[str]]:
    """Dassl's ``split_dataset_by_label``: label -> ids in list order; labels in order of first appearance."""
    out: dict[int, list[str]] = {}
    for fid, y in items:
        out.setdefault(y, []).append(fid)
    return out


def sample_split_dassl(source, shots: int, seed: int, allow_fewer: bool = False,
                       test_split: str | None = None) -> dict:
    """Dassl's ``generate_fewshot_dataset`` (train, K) then (val, min(K, 4)) after ``random.seed(seed)``; a
    local ``random.Random(seed)`` draws the same numbers as the seeded global RNG."""
    rng = random.Random(seed)
    train_groups = _groups_by_first_appearance(source.items("train"))
    short = [(source.class_keys[y], len(ids)) for y, ids in train_groups.items() if len(ids) < shots]
    missing = [k for i, k in enumerate(source.class_keys) if i not in train_groups]
    if (short or missing) and not allow_fewer:
        raise FewShotDataError(f"shots={shots} is larger than classes {short[:5] or missing[:5]} (train images), "
                               f"lower `shots` or set allow_fewer (Dassl then takes all of them).")
    train = {k: [] for k in source.class_keys}
    for y, ids in train_groups.items():
        train[source.class_keys[y]] = sorted(rng.sample(ids, shots) if len(ids) >= shots else ids)
    val_shots = min(shots, 4)
    test = test_split_of(source, test_split)
    val_split = next((s for s in ("val", "validation") if s in source.splits and s != test), None)
    if val_split is None:  # not Dassl's (CoOp's ImageNet validates on its test set): held-out train images
        val_split = "train"
        picked = {f for ids in train.values() for f in ids}
        val_items = [(f, y) for f, y in source.items("train") if f not in picked]
    else:
        val_items = source.items(val_split)
    val = {k: [] for k in source.class_keys}
    for y, ids in _groups_by_first_appearance(val_items).items():
        val[source.class_keys[y]] = sorted(rng.sample(ids, val_shots) if len(ids) >= val_shots else ids)
    return {"format": MANIFEST_FORMAT, "source": source.identity(), "shots": shots, "seed": seed,
            "sampler": "dassl", "val_shots": val_shots, "val_split": val_split, "train": train, "val": val}


def sample_split(source, shots: int, seed: int, allow_fewer: bool = False, test_split: str | None = None,
                 sampler: FewShotSampler = "xclip") -> dict:
    """CoOp few-shot sampling: per class `rng.sample(items, K)`; val = min(K, 4) per class (module doc)."""
    if sampler == "dassl":
        return sample_split_dassl(source, shots, seed, allow_fewer, test_split)
    if sampler != "xclip":
        raise FewShotDataError(f"fewshot_sampler={sampler!r}; expected 'xclip' or 'dassl'.")
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {i: [] for i in range(len(source.class_keys))}
    for fid, y in source.items("train"):
        by_class[y].append(fid)
    train: dict[str, list[str]] = {}
    for y, ids in by_class.items():
        if len(ids) < shots and not allow_fewer:
            raise FewShotDataError(f"shots={shots} is larger than class {source.class_keys[y]!r} (index {y}), "
                                   f"which has only {len(ids)} train images; lower `shots` or set allow_fewer.")
        train[source.class_keys[y]] = sorted(rng.sample(ids, min(shots, len(ids))))
    val_shots = min(shots, 4)
    val_split = next((s for s in ("val", "validation") if s in source.splits and s != test_split_of(source, test_split)), None)
    val: dict[str, list[str]] = {}
    if val_split is not None:
        pool: dict[int, list[str]] = {i: [] for i in by_class}
        for fid, y in source.items(val_split):
            pool[y].append(fid)
    else:
        val_split = "train"
        pool = {y: sorted(set(ids) - set(train[source.class_keys[y]])) for y, ids in by_class.items()}
    for y, ids in pool.items():
        val[source.class_keys[y]] = sorted(rng.sample(ids, min(val_shots, len(ids))))
    return {"format": MANIFEST_FORMAT, "source": source.identity(), "shots": shots, "seed": seed,
            "sampler": "xclip", "val_shots": val_shots, "val_split": val_split, "train": train, "val": val}


def manifest_path(data_dir: str | Path, slug: str, shots: int, seed: int, sampler: str = "xclip") -> Path:
    suffix = "" if sampler == "xclip" else f"-{sampler}"
    return Path(data_dir) / "fewshot_splits" / slug / f"shot_{shots}-seed_{seed}{suffix}.json"


def test_split_of(source, requested: str | None = None) -> str:
    """The split to test on: ``requested``, else the first labelled one of test / val / validation.

    A split without labels (HF ``imagenet-1k``'s ``test`` holds label -1 only) is skipped, so ImageNet tests on its
    validation set as CoOp does.
    """
    if requested:
        if requested not in source.splits:
            raise FewShotDataError(f"test split {requested!r} not in the dataset (splits: {source.splits}).")
        if not source.items(requested):
            raise FewShotDataError(f"test split {requested!r} has no labelled images.")
        return requested
    for s in ("test", "val", "validation"):
        if s in source.splits and source.items(s):
            return s
    raise FewShotDataError(f"The dataset has no labelled test/val split to evaluate on (splits: {source.splits}).")


def check_manifest(manifest: dict, source, path: Path, shots: int, seed: int, sampler: str = "xclip") -> None:
    """Fail with a message naming ``path`` when the manifest does not describe this dataset/split."""
    def bad(msg: str):
        raise FewShotDataError(f"Split file {path} does not match the dataset: {msg}. Delete it to resample.")

    if manifest.get("format") != MANIFEST_FORMAT:
        bad(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    if manifest.get("sampler", "xclip") != sampler:  # manifests written before the option are the xclip sampler's
        bad(f"it was picked by sampler {manifest.get('sampler', 'xclip')!r}, expected {sampler!r}")
    if manifest.get("shots") != shots or manifest.get("seed") != seed:
        bad(f"it holds shots={manifest.get('shots')} seed={manifest.get('seed')}, expected shots={shots} seed={seed}")
    keys = manifest.get("source", {}).get("class_keys")
    if keys != list(source.class_keys):
        bad(f"{len(keys or [])} classes {list((keys or [])[:3])}... vs the dataset's {len(source.class_keys)} "
            f"classes {list(source.class_keys[:3])}...")
    index = {k: i for i, k in enumerate(source.class_keys)}
    for part, split in (("train", "train"), ("val", manifest.get("val_split", "train"))):
        for key, ids in manifest.get(part, {}).items():
            for fid in ids:
                if source.label_of(split, fid) != index.get(key):
                    bad(f"{part} id {fid!r} of class {key!r} is missing from split {split!r} or has another label")


def load_or_create_manifest(source, path: Path, shots: int, seed: int, allow_fewer: bool = False,
                            test_split: str | None = None, sampler: FewShotSampler = "xclip") -> dict:
    if path.is_file():
        try:
            manifest = read_json(path, "Split file")
        except ValueError as e:
            raise FewShotDataError(f"{e}; delete it to resample.") from e
        check_manifest(manifest, source, path, shots, seed, sampler)
        return manifest
    manifest = sample_split(source, shots, seed, allow_fewer, test_split, sampler)
    atomic_write_json(manifest, path)
    log.info("wrote few-shot split %s", path)
    return manifest


# ---- images ---------------------------------------------------------------------------------------------------
def try_decode(source, split: str, file_id: str) -> str | None:
    """None if the image decodes, else the error (cheap: JPEGs are decoded at reduced scale)."""
    try:
        img = source.open(split, file_id)
        img.draft("RGB", (64, 64))
        img.load()
        return None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
        return f"{type(e).__name__}: {e}"


def filter_bad_images(source, split: str, items: list[Item], max_bad_fraction: float, what: str) -> tuple[list[Item], list[dict]]:
    """Drop unreadable images; raise when more than ``max_bad_fraction`` of ``items`` are bad."""
    bad = []
    for fid, y in items:
        err = try_decode(source, split, fid)
        if err is not None:
            bad.append({"path": source.describe(split, fid), "error": err})
    if bad:
        log.warning("%d/%d unreadable images in %s: %s", len(bad), len(items), what,
                    ", ".join(b["path"] for b in bad[:10]))
    if items and len(bad) / len(items) > max_bad_fraction:
        raise FewShotDataError(
            f"{len(bad)} of {len(items)} images in {what} are unreadable ({len(bad) / len(items):.1%} > "
            f"max_bad_fraction={max_bad_fraction}): " + "; ".join(f"{b['path']} ({b['error']})" for b in bad[:10]))
    bad_ids = {b["path"] for b in bad}
    return [it for it in items if source.describe(split, it[0]) not in bad_ids], bad


class SplitDataset(Dataset):
    """(image tensor, label) for a list of (file id, label) of one split."""

    def __init__(self, source, split: str, items: list[Item], transform: Callable):
        self.source, self.split, self.items, self.transform = source, split, items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        fid, y = self.items[i]
        try:
            img = self.source.open(self.split, fid).convert("RGB")
        except Exception as e:
            raise OSError(f"Could not read image {self.source.describe(self.split, fid)}: {e}") from e
        return self.transform(img), y


def clip_transforms(image_size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                    crop_scale_min: float = 0.08) -> tuple[Callable, Callable]:
    """CoOp's train (random-resized-crop, flip) and test (resize short side + center crop) transforms."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    norm = T.Normalize(mean, std)
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), T.ToTensor(), norm])
    return train, test


@dataclass
class FewShotData:
    """Everything a caller needs after resolving a split (used by the datamodule and the zeroshot suite)."""
    source: object
    manifest: dict
    classnames: list[str]
    test_split: str


def resolve_fewshot(dataset: str, shots: int, seed: int, data_dir: str = "data", classnames_file: str | None = None,
                    hf_config: str | None = None, test_split: str | None = None, allow_fewer: bool = False,
                    cache_dir: str | None = None, sampler: FewShotSampler = "xclip") -> FewShotData:
    if shots < 1:
        raise FewShotDataError(f"shots must be >= 1, got {shots}.")
    source = open_source(dataset, hf_config, cache_dir)
    names = read_classnames(classnames_file, source.class_keys) if classnames_file else source.default_names
    path = manifest_path(data_dir, dataset_slug(dataset, hf_config), shots, seed, sampler)
    manifest = load_or_create_manifest(source, path, shots, seed, allow_fewer, test_split, sampler)
    return FewShotData(source, manifest, names, test_split_of(source, test_split))


def manifest_items(manifest: dict, part: str, class_keys: Sequence[str]) -> list[Item]:
    index = {k: i for i, k in enumerate(class_keys)}
    return [(fid, index[k]) for k, ids in manifest[part].items() for fid in ids]


class FewShotDataModule(pl.LightningDataModule):
    """K-shot train / min(K,4)-shot val / full test loaders of an image classification dataset."""

    def __init__(self, dataset: str, shots: int = 16, seed: int = 1, data_dir: str = "data",
                 classnames_file: str | None = None, hf_config: str | None = None, test_split: str | None = None,
                 image_size: int = 224, batch_size: int = 32, test_batch_size: int = 100, num_workers: int = 4,
                 crop_scale_min: float = 0.08, allow_fewer: bool = False, check_images: bool = True,
                 max_bad_fraction: float = 0.01, cache_dir: str | None = None,
                 fewshot_sampler: FewShotSampler = "xclip"):
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise FewShotDataError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
        self._data: FewShotData | None = None
        self.bad_images: dict[str, list[dict]] = {}

    # resolved lazily so that a bad dataset fails in prepare_data, before any model work
    @property
    def data(self) -> FewShotData:
        if self._data is None:
            h = self.hparams
            self._data = resolve_fewshot(h.dataset, h.shots, h.seed, h.data_dir, h.classnames_file, h.hf_config,
                                         h.test_split, h.allow_fewer, h.cache_dir, h.fewshot_sampler)
        return self._data

    @property
    def classnames(self) -> list[str]:
        return self.data.classnames

    @property
    def image_size(self) -> int:
        return int(self.hparams.image_size)

    def prepare_data(self) -> None:
        _ = self.data  # writes the manifest once (rank 0)

    def setup(self, stage: str | None = None) -> None:
        d, h = self.data, self.hparams
        train_tf, test_tf = clip_transforms(h.image_size, crop_scale_min=h.crop_scale_min)
        parts = {"train": ("train", manifest_items(d.manifest, "train", d.source.class_keys), train_tf),
                 "val": (d.manifest["val_split"], manifest_items(d.manifest, "val", d.source.class_keys), test_tf),
                 "test": (d.test_split, d.source.items(d.test_split), test_tf)}
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(
            stage, ("train", "val", "test"))
        for name in wanted:
            split, items, tf = parts[name]
            if h.check_images:
                items, self.bad_images[name] = filter_bad_images(d.source, split, items, h.max_bad_fraction,
                                                                 f"the {name} split ({split}) of {h.dataset}")
            setattr(self, f"{name}_set", SplitDataset(d.source, split, items, tf))

    def _loader(self, ds: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train and len(ds) >= batch_size,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if is_distributed(self):
            return self._loader(self.train_set, h.batch_size, True)
        # Order from (seed, epoch), augmentation from a per-item seed: independent of the global RNG and of
        # num_workers, and resumable mid-epoch (datamodules/resumable.py).
        return ResumableLoader(self.train_set, batch_size=h.batch_size, shuffle=True, seed_items=True,
                               drop_last=len(self.train_set) >= h.batch_size, num_workers=h.num_workers,
                               persistent_workers=h.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.test_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.hparams.test_batch_size, False)
