"""IIIT5K-Word (Mishra, Alahari, Jawahar, BMVC 2012) test split with its lexicons, for CLIP-as-OCR evaluation.

Local layout = the original release (``IIIT5K-Word_V3.0.tar.gz`` unpacked)::

    ROOT/                       (the IIIT5K/ folder, or its parent)
      testdata.mat              struct array ``testdata`` [1, 3000], fields ImgName ("test/1002_1.png"),
                                GroundTruth (word), smallLexi (50 words), mediumLexi (1,000 words)
      test/*.png                cropped word images
      lexicon.txt               (optional) the 0.5 M-word lexicon of Weinman et al. 2009

or the Hugging Face dataset ``HuggingFaceM4/IIIT-5K`` (columns image, label, small_lexicon, medium_lexicon).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

EXPECTED_LAYOUT = ("ROOT/testdata.mat (MATLAB struct 'testdata' with fields ImgName, GroundTruth, smallLexi, "
                   "mediumLexi) and ROOT/test/*.png: the unpacked IIIT5K-Word_V3.0.tar.gz (ROOT may also be the "
                   "folder holding IIIT5K/)")
FIELDS = ("ImgName", "GroundTruth", "smallLexi", "mediumLexi")


@dataclass
class IIIT5KSample:
    image: Any                      # PIL image, or a path loaded lazily by ``load_image``
    label: str
    small_lexicon: list[str]
    medium_lexicon: list[str]

    def load_image(self) -> Image.Image:
        return self.image.convert("RGB") if isinstance(self.image, Image.Image) else \
            Image.open(self.image).convert("RGB")


def _strings(x: Any) -> list[str]:
    """A MATLAB char array / cell array as loaded by scipy.io.loadmat -> flat list of str."""
    if isinstance(x, str):
        return [x]
    if isinstance(x, bytes):
        return [x.decode()]
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "US":
            return [str(s) for s in x.reshape(-1)]
        out: list[str] = []
        for item in x.reshape(-1):
            out.extend(_strings(item))
        return out
    return [str(x)]


def find_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"IIIT5K folder {root} does not exist. Expected layout: {EXPECTED_LAYOUT}")
    for cand in (root, root / "IIIT5K"):
        if (cand / "testdata.mat").is_file():
            return cand
    raise FileNotFoundError(f"IIIT5K: no testdata.mat in {root} (or {root / 'IIIT5K'}). "
                            f"Expected layout: {EXPECTED_LAYOUT}")


def load_iiit5k_folder(root: str | Path, limit: int | None = None) -> list[IIIT5KSample]:
    """Read testdata.mat and check that the listed images exist."""
    from scipy.io import loadmat

    root = find_root(root)
    mat_path = root / "testdata.mat"
    try:
        mat = loadmat(str(mat_path))
    except Exception as e:  # not a MATLAB file
        raise ValueError(f"IIIT5K: could not read {mat_path} as a MATLAB file: {e}. "
                         f"Expected layout: {EXPECTED_LAYOUT}") from e
    if "testdata" not in mat:
        raise ValueError(f"IIIT5K: {mat_path} has no variable 'testdata' (found "
                         f"{[k for k in mat if not k.startswith('__')]}). Expected layout: {EXPECTED_LAYOUT}")
    records = mat["testdata"].reshape(-1)
    names = records.dtype.names or ()
    missing = [f for f in FIELDS if f not in names]
    if missing:
        raise ValueError(f"IIIT5K: {mat_path}:testdata lacks fields {missing} (has {list(names)}). "
                         f"Expected layout: {EXPECTED_LAYOUT}")
    samples = []
    for rec in records[:limit] if limit else records:
        img_name = _strings(rec["ImgName"])[0]
        path = root / img_name
        if not path.is_file():
            raise FileNotFoundError(f"IIIT5K: image {path} listed in {mat_path} is missing. "
                                    f"Expected layout: {EXPECTED_LAYOUT}")
        samples.append(IIIT5KSample(path, _strings(rec["GroundTruth"])[0], _strings(rec["smallLexi"]),
                                    _strings(rec["mediumLexi"])))
    if not samples:
        raise ValueError(f"IIIT5K: {mat_path} lists no test images")
    return samples


def load_iiit5k_hf(name: str = "HuggingFaceM4/IIIT-5K", split: str = "test", limit: int | None = None,
                   cache_dir: str | None = None) -> list[IIIT5KSample]:
    """The HF dataset (script loader that downloads the original tarball; needs network or a warm cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir, trust_remote_code=True)
    except TypeError:  # datasets versions without trust_remote_code
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    cols = {"image", "label", "small_lexicon", "medium_lexicon"}
    if not cols <= set(ds.column_names):
        raise ValueError(f"HF dataset {name}:{split} lacks columns {sorted(cols - set(ds.column_names))} "
                         f"(has {ds.column_names})")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [IIIT5KSample(r["image"], r["label"], list(r["small_lexicon"]), list(r["medium_lexicon"])) for r in ds]


def load_large_lexicon(root: str | Path) -> list[str] | None:
    """ROOT/lexicon.txt (one word per line), or None when absent."""
    path = find_root(root) / "lexicon.txt"
    if not path.is_file():
        return None
    return [w.strip() for w in path.read_text(errors="ignore").splitlines() if w.strip()]


def write_iiit5k_folder(root: str | Path, samples: list[tuple[Image.Image, str, list[str], list[str]]]) -> Path:
    """Write samples (image, word, small lexicon, medium lexicon) in the original release layout (for tests)."""
    from scipy.io import savemat

    root = Path(root)
    (root / "test").mkdir(parents=True, exist_ok=True)
    rec = np.zeros((1, len(samples)), dtype=[(f, object) for f in FIELDS])
    for i, (img, word, small, medium) in enumerate(samples):
        name = f"test/{i + 1}_1.png"
        img.save(root / name)
        rec[0, i] = (name, word, np.array(small, dtype=object).reshape(1, -1),
                     np.array(medium, dtype=object).reshape(1, -1))
    savemat(str(root / "testdata.mat"), {"testdata": rec})
    return root
