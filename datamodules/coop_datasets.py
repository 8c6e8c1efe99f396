"""CoOp's ten fine-grained datasets from folders in CoOp's layout (KaiyangZhou/CoOp ``DATASETS.md``).

    dm = CoOpDatasetDataModule("OxfordPets", root="$DATA", shots=16, seed=1, fewshot_sampler="dassl")

``root`` is CoOp's ``DATASET.ROOT`` (the folder holding ``oxford_pets/``, ``caltech-101/``...) or the dataset folder
itself.  The fixed train/val/test lists come from CoOp's ``split_zhou_<Name>.json`` (``{"train": [[relpath, label,
classname], ...], "val": [...], "test": [...]}``, paths relative to the image folder below), except FGVCAircraft,
whose lists are the dataset's own ``images_variant_{train,val,test}.txt`` + ``variants.txt`` as CoOp reads them.

| dataset | folder | images under | split file |
|---|---|---|---|
| OxfordPets | oxford_pets | images | split_zhou_OxfordPets.json |
| Caltech101 | caltech-101 | 101_ObjectCategories | split_zhou_Caltech101.json |
| Food101 | food-101 | images | split_zhou_Food101.json |
| StanfordCars | stanford_cars | (the folder itself) | split_zhou_StanfordCars.json |
| OxfordFlowers (Flowers102) | oxford_flowers | jpg | split_zhou_OxfordFlowers.json |
| FGVCAircraft | fgvc_aircraft | images | variants.txt, images_variant_*.txt |
| SUN397 | sun397 | SUN397 | split_zhou_SUN397.json |
| DescribableTextures (DTD) | dtd | images | split_zhou_DescribableTextures.json |
| EuroSAT | eurosat | 2750 | split_zhou_EuroSAT.json |
| UCF101 | ucf101 | UCF-101-midframes | split_zhou_UCF101.json |

Few-shot picks, in order of preference: CoOp's cached ``split_fewshot/shot_K-seed_S.pkl`` when present
(``use_split_fewshot``; read with ``read_split_fewshot_pkl``, which maps exactly Dassl's ``Datum`` to a local
record and refuses any other class), else ``fewshot_sampler="dassl"`` (the same picks as CoOp with the same seed),
else the project's sampler.  Either way the picks are recorded in the project's JSON manifest under
``data_dir/fewshot_splits/`` (never in the dataset folder).  Class names are the split's (label order), with
``_`` -> space in the prompts as CoOp does.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from PIL import Image

from xclip.datamodules.fewshot import (
    MANIFEST_FORMAT,
    FewShotData,
    FewShotDataError,
    FewShotDataModule,
    Item,
    check_manifest,
    dataset_slug,
    load_or_create_manifest,
    manifest_path,
    test_split_of,
)
from xclip.utils.io import atomic_write_json

log = logging.getLogger(__name__)

CoOpDatasetName = Literal["OxfordPets", "Caltech101", "Food101", "StanfordCars", "OxfordFlowers", "FGVCAircraft",
                          "SUN397", "DescribableTextures", "EuroSAT", "UCF101"]


@dataclass(frozen=True)
class CoOpLayout:
    folder: str         # under DATASET.ROOT
    image_dir: str      # under the folder ("" = the folder itself)
    split_file: str | None  # None: FGVCAircraft's own txt lists


LAYOUTS: dict[str, CoOpLayout] = {
    "OxfordPets": CoOpLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "Caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "Food101": CoOpLayout("food-101", "images", "split_zhou_Food101.json"),
    "StanfordCars": CoOpLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "OxfordFlowers": CoOpLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "FGVCAircraft": CoOpLayout("fgvc_aircraft", "images", None),
    "SUN397": CoOpLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DescribableTextures": CoOpLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": CoOpLayout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": CoOpLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
SPLITS = ("train", "val", "test")
Entry = tuple[str, int, str]  # (path relative to the image folder, label, class name)


# ---- split_zhou / FGVCAircraft lists ----------------------------------------------------------------------------
def _safe_relpath(rel: Any, where: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise FewShotDataError(f"{where}: image path must be a non-empty string, got {rel!r}.")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise FewShotDataError(f"{where}: image path {rel!r} leaves the image folder (absolute or '..').")
    return p.as_posix()


def read_split_zhou(path: str | Path) -> dict[str, list[Entry]]:
    """CoOp's ``split_zhou_<Name>.json`` -> {"train"|"val"|"test": [(relpath, label, classname), ...]} in file
    order (the order CoOp reads them, which the Dassl sampler depends on)."""
    path = Path(path)
    if not path.is_file():
        raise FewShotDataError(f"CoOp split file not found: {path} (CoOp's DATASETS.md links each "
                               f"split_zhou_<Name>.json; put it in the dataset folder).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewShotDataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in SPLITS):
        raise FewShotDataError(f"{path}: expected {{'train': [...], 'val': [...], 'test': [...]}}, got "
                               f"{sorted(data) if isinstance(data, dict) else type(data).__name__}.")
    out: dict[str, list[Entry]] = {}
    for split in SPLITS:
        rows = []
        for i, row in enumerate(data[split]):
            where = f"{path} [{split}][{i}]"
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[2], str)):
                raise FewShotDataError(f"{where}: expected [relative path, label, class name], got {row!r}.")
            try:
                label = int(row[1])
            except (TypeError, ValueError):
                raise FewShotDataError(f"{where}: label {row[1]!r} is not an integer.") from None
            if label < 0 or isinstance(row[1], bool) or float(row[1]) != label:
                raise FewShotDataError(f"{where}: label {row[1]!r} is not a non-negative integer.")
            rows.append((_safe_relpath(row[0], where), label, row[2]))
        out[split] = rows
    return out


def read_fgvc_aircraft_lists(folder: str | Path) -> dict[str, list[Entry]]:
    """FGVCAircraft as CoOp reads it: labels = line order of ``variants.txt``; ``images_variant_<split>.txt``
    lines ``<image id> <variant words>`` -> ``<image id>.jpg`` under ``images/``."""
    folder = Path(folder)
    vfile = folder / "variants.txt"
    if not vfile.is_file():
        raise FewShotDataError(f"FGVCAircraft: {vfile} not found (CoOp's layout: fgvc_aircraft/ = the archive's "
                               f"data/ folder with images/, variants.txt, images_variant_*.txt).")
    variants = [ln.strip() for ln in vfile.read_text(encoding="utf-8").splitlines()]
    variants = [v for v in variants if v]
    index = {v: i for i, v in enumerate(variants)}
    out: dict[str, list[Entry]] = {}
    for split in SPLITS:
        f = folder / f"images_variant_{split}.txt"
        if not f.is_file():
            raise FewShotDataError(f"FGVCAircraft: {f} not found.")
        rows = []
        for n, ln in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            parts = ln.strip().split(" ")
            if not ln.strip():
                continue
            name = " ".join(parts[1:])
            if name not in index:
                raise FewShotDataError(f"{f}:{n}: variant {name!r} is not in {vfile}.")
            rows.append((_safe_relpath(parts[0] + ".jpg", f"{f}:{n}"), index[name], name))
        out[split] = rows
    return out


# ---- split_fewshot/shot_K-seed_S.pkl --------------------------------------------------------------------------------
class DasslDatum:
    """Local stand-in for ``dassl.data.datasets.base_dataset.Datum`` (impath, label, domain, classname)."""

    __slots__ = ("impath", "label", "domain", "classname")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"Datum state must be a dict, got {type(state).__name__}")
        get = {k.lstrip("_"): v for k, v in state.items()}
        impath, label, domain, classname = (get.get("impath", ""), get.get("label", 0), get.get("domain", 0),
                                            get.get("classname", ""))
        if not (isinstance(impath, str) and isinstance(classname, str) and type(label) is int
                and type(domain) is int):
            raise pickle.UnpicklingError(f"Datum fields have unexpected types: {state!r:.200}")
        self.impath, self.label, self.domain, self.classname = impath, label, domain, classname

    def __repr__(self) -> str:
        return f"Datum({self.impath!r}, {self.label}, {self.classname!r})"


class _DatumUnpickler(pickle.Unpickler):
    """Resolves exactly one global, Dassl's Datum, to DasslDatum; every other global is refused."""

    ALLOWED = {("dassl.data.datasets.base_dataset", "Datum"): DasslDatum}

    def find_class(self, module: str, name: str):
        cls = self.ALLOWED.get((module, name))
        if cls is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (a CoOp few-shot file holds only "
                                         f"dassl.data.datasets.base_dataset.Datum)")
        return cls


def read_split_fewshot_pkl(path: str | Path) -> dict[str, list[DasslDatum]]:
    """CoOp's ``split_fewshot/shot_K-seed_S.pkl`` (``pickle.dump({"train": [Datum...], "val": [...]})``; ImageNet's
    holds "train" only) -> the same dict of DasslDatum records, without importing or running anything else."""
    path = Path(path)
    try:
        data = _DatumUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise FewShotDataError(f"CoOp few-shot file not found: {path}") from None
    except Exception as e:
        raise FewShotDataError(f"Could not read CoOp few-shot file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict) or "train" not in data:
        raise FewShotDataError(f"{path}: expected {{'train': [Datum...], 'val': [...]}}, got "
                               f"{sorted(data) if isinstance(data, dict) else type(data).__name__}.")
    for k, items in data.items():
        if k not in ("train", "val") or not isinstance(items, list) or not all(isinstance(d, DasslDatum) for d in items):
            raise FewShotDataError(f"{path}: entry {k!r} should be a list of Datum ('train' / 'val' only).")
    return data


# ---- source ---------------------------------------------------------------------------------------------------------
def resolve_dataset_dir(dataset: str, root: str | Path) -> Path:
    """``root`` may be CoOp's DATASET.ROOT or the dataset folder itself."""
    if dataset not in LAYOUTS:
        raise FewShotDataError(f"Unknown CoOp dataset {dataset!r}; one of {sorted(LAYOUTS)} (Flowers102 is "
                               f"'OxfordFlowers', DTD is 'DescribableTextures', as in CoOp's configs).")
    lay, root = LAYOUTS[dataset], Path(root).expanduser()
    marker = lay.split_file or "variants.txt"
    for cand in (root / lay.folder, root):
        if (cand / marker).is_file():
            return cand
    raise FewShotDataError(f"{dataset}: found neither {root / lay.folder / marker} nor {root / marker}. CoOp's "
                           f"layout: $DATA/{lay.folder}/{{{lay.image_dir or '<images>'}/, {marker}}} "
                           f"(see docs/byo_weights.md, CoOp section).")


class CoOpSplitSource:
    """A CoOp dataset folder as a few-shot source (interface of datamodules.fewshot's sources); file ids are the
    split file's relative paths, labels and class names the split's."""

    kind = "coop"

    def __init__(self, dataset: str, root: str | Path):
        self.dataset = dataset
        self.dir = resolve_dataset_dir(dataset, root)
        lay = LAYOUTS[dataset]
        self.image_dir = self.dir / lay.image_dir if lay.image_dir else self.dir
        self.split_path = self.dir / lay.split_file if lay.split_file else self.dir / "variants.txt"
        self.lists = read_split_zhou(self.split_path) if lay.split_file else read_fgvc_aircraft_lists(self.dir)
        names: dict[int, str] = {}
        for split in SPLITS:
            for rel, y, c in self.lists[split]:
                if names.setdefault(y, c) != c:
                    raise FewShotDataError(f"{self.split_path}: label {y} is named both {names[y]!r} and {c!r}.")
        n = max(names) + 1 if names else 0
        if sorted(names) != list(range(n)) or not self.lists["train"]:
            raise FewShotDataError(f"{self.split_path}: labels must be 0..C-1 with train images (got "
                                   f"{len(names)} labels up to {n - 1}, {len(self.lists['train'])} train images).")
        if len(set(names.values())) != n:
            raise FewShotDataError(f"{self.split_path}: two labels share a class name.")
        self.class_keys = [names[i] for i in range(n)]  # label order, as Dassl's get_lab2cname
        self.splits = [s for s in SPLITS if self.lists[s]]
        self._labels = {s: {rel: y for rel, y, _ in self.lists[s]} for s in SPLITS}

    @property
    def default_names(self) -> list[str]:
        return [k.replace("_", " ") for k in self.class_keys]

    def items(self, split: str) -> list[Item]:
        return [(rel, y) for rel, y, _ in self.lists[split]]

    def label_of(self, split: str, file_id: str) -> int | None:
        y = self._labels.get(split, {}).get(file_id)
        return y if y is not None and (self.image_dir / file_id).is_file() else None

    def describe(self, split: str, file_id: str) -> str:
        return str(self.image_dir / file_id)

    def open(self, split: str, file_id: str) -> Image.Image:
        return Image.open(self.image_dir / file_id)

    def identity(self) -> dict:
        return {"kind": self.kind, "dataset": self.dataset, "dir": str(self.dir.resolve()),
                "split_file": self.split_path.name, "class_keys": self.class_keys}

    # ---- CoOp's cached few-shot picks -------------------------------------------------------------------------
    def fewshot_pkl(self, shots: int, seed: int) -> Path:
        return self.dir / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"

    def _match(self, split: str, d: DasslDatum, path: Path) -> str:
        """Datum.impath is absolute on the machine that wrote the pkl: find the split entry it ends with."""
        parts = PurePosixPath(d.impath.replace("\\", "/")).parts
        known = self._labels[split]
        for k in range(len(parts), 0, -1):
            rel = PurePosixPath(*parts[-k:]).as_posix()
            if rel in known:
                if known[rel] != d.label:
                    raise FewShotDataError(f"{path}: {d.impath} has label {d.label} but {self.split_path.name} "
                                           f"gives {rel} label {known[rel]}.")
                return rel
        raise FewShotDataError(f"{path}: {d.impath} matches no {split} image of {self.split_path.name}; the pkl "
                               f"was made from another split of {self.dataset}.")

    def manifest_from_pkl(self, path: Path, shots: int, seed: int) -> dict:
        data = read_split_fewshot_pkl(path)
        parts: dict[str, dict[str, list[str]]] = {}
        for part in ("train", "val"):
            picked: dict[str, list[str]] = {k: [] for k in self.class_keys}
            for d in data.get(part, []):
                rel = self._match(part, d, path)
                picked[self.class_keys[self._labels[part][rel]]].append(rel)
            parts[part] = {k: sorted(v) for k, v in picked.items()}
        return {"format": MANIFEST_FORMAT, "source": self.identity(), "shots": shots, "seed": seed,
                "sampler": "split_fewshot_pkl", "picks_from": str(path), "val_shots": min(shots, 4),
                "val_split": "val", "train": parts["train"], "val": parts["val"]}


def resolve_coop_fewshot(dataset: str, root: str | Path, shots: int, seed: int, data_dir: str = "data",
                         fewshot_sampler: Literal["xclip", "dassl"] = "dassl", use_split_fewshot: bool = True,
                         allow_fewer: bool = False) -> FewShotData:
    if shots < 1:
        raise FewShotDataError(f"shots must be >= 1, got {shots}.")
    source = CoOpSplitSource(dataset, root)
    slug = dataset_slug(f"coop-{dataset}-{source.dir.resolve()}")
    pkl = source.fewshot_pkl(shots, seed)
    if use_split_fewshot and pkl.is_file():
        manifest = source.manifest_from_pkl(pkl, shots, seed)
        path = manifest_path(data_dir, slug, shots, seed, "split_fewshot_pkl")
        if path.is_file():
            recorded = json.loads(path.read_text())
            check_manifest(recorded, source, path, shots, seed, "split_fewshot_pkl")
            if (recorded["train"], recorded["val"]) != (manifest["train"], manifest["val"]):
                raise FewShotDataError(f"{pkl} now picks other images than recorded in {path}; delete the record "
                                       f"to accept the new picks.")
        else:
            atomic_write_json(manifest, path)
        log.info("%s: few-shot picks from CoOp's %s (recorded in %s)", dataset, pkl, path)
    else:
        path = manifest_path(data_dir, slug, shots, seed, fewshot_sampler)
        manifest = load_or_create_manifest(source, path, shots, seed, allow_fewer, "test", fewshot_sampler)
    return FewShotData(source, manifest, source.default_names, test_split_of(source, "test"))


class CoOpDatasetDataModule(FewShotDataModule):
    """K-shot train / min(K,4)-shot val / full test loaders of one of CoOp's datasets (CoOp's layout, see module
    doc).  Transforms, loaders and bad-image handling are FewShotDataModule's."""

    def __init__(self, dataset: CoOpDatasetName, root: str, shots: int = 16, seed: int = 1, data_dir: str = "data",
                 fewshot_sampler: Literal["xclip", "dassl"] = "dassl", use_split_fewshot: bool = True,
                 image_size: int = 224, batch_size: int = 32, test_batch_size: int = 100, num_workers: int = 4,
                 crop_scale_min: float = 0.08, allow_fewer: bool = False, check_images: bool = True,
                 max_bad_fraction: float = 0.01):
        super().__init__(dataset=dataset, shots=shots, seed=seed, data_dir=data_dir, image_size=image_size,
                         batch_size=batch_size, test_batch_size=test_batch_size, num_workers=num_workers,
                         crop_scale_min=crop_scale_min, allow_fewer=allow_fewer, check_images=check_images,
                         max_bad_fraction=max_bad_fraction, fewshot_sampler=fewshot_sampler)
        self.save_hyperparameters()

    @property
    def data(self) -> FewShotData:
        if self._data is None:
            h = self.hparams
            self._data = resolve_coop_fewshot(h.dataset, h.root, h.shots, h.seed, h.data_dir, h.fewshot_sampler,
                                              h.use_split_fewshot, h.allow_fewer)
        return self._data
