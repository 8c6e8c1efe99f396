"""Synthetic quintuple features with known structure, for spelling tests and benchmarks (no backbone needed).

Class information lives in dims [0, 16), word information in dims [16, 48), a modality offset in [48, 64);
x_it carries both the class and the word (the word stronger: a typographic attack). Noise everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def synthetic_features(n: int, n_words: int, seed: int, n_classes: int = 10, d: int = 64,
                       word_offset: int = 0, noise: float = 0.5, class_in_xit: float = 1.0, nuisance: float = 1.5) -> dict:
    g = torch.Generator().manual_seed(1000)            # class / modality directions shared by all splits
    cls_dirs = torch.zeros(n_classes, d)
    cls_dirs[:, :16] = torch.randn(n_classes, 16, generator=g)
    m_img, m_txt = torch.zeros(d), torch.zeros(d)
    m_img[48:] = torch.randn(16, generator=g)
    m_txt[48:] = torch.randn(16, generator=g)
    name_dirs = torch.zeros(n_classes, d)             # class names rendered as words
    name_dirs[:, 16:48] = torch.randn(n_classes, 32, generator=g)
    gw = torch.Generator().manual_seed(2000 + word_offset)   # words: disjoint per split
    word_dirs = torch.zeros(n_words, d)
    word_dirs[:, 16:48] = torch.randn(n_words, 32, generator=gw) * 1.2
    gs = torch.Generator().manual_seed(seed)
    cid = torch.randint(0, n_classes, (n,), generator=gs)
    wid = torch.randint(0, n_words, (n,), generator=gs)
    nuis = torch.zeros(d)
    nuis[48:] = 1.0

    def nz():  # isotropic noise + a strong per-sample nuisance in the modality dims (projections can drop it)
        return noise * torch.randn(n, d, generator=gs) + nuisance * nuis * torch.randn(n, d, generator=gs)
    c, w = cls_dirs[cid], word_dirs[wid]
    return {
        "x_i": F.normalize(c + m_img + nz(), dim=-1),
        "x_t": F.normalize(w + m_img + nz(), dim=-1),
        "x_it": F.normalize(class_in_xit * c + w + m_img + nz(), dim=-1),
        "y_t": F.normalize(w + m_txt + nz(), dim=-1),
        "class_id": cid, "real": wid % 2 == 0,
        "class_text": F.normalize(cls_dirs + m_txt, dim=-1),
        "class_word_image": F.normalize(name_dirs + m_img, dim=-1),
        "words": [f"w{int(i)}" for i in wid], "classnames": [f"c{i}" for i in range(n_classes)],
    }
