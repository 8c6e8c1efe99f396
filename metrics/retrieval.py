"""Top-k retrieval accuracy (Recall@k) over a similarity matrix, for image<->text and word-image<->string tasks.

Relevance is given by integer *keys*: gallery item g is relevant to query q when ``gallery_keys[g] ==
query_keys[q]`` (paired data: keys = arange(N)). A query is a hit at k when fewer than k irrelevant gallery items
score at least as high as its best relevant item. Ties therefore count against the query ("pessimistic"), which
reproduces the disentangling code's rule that repeated strings in a gallery count as errors when every copy has
its own key (disentangle.md 5.1), and makes the result independent of gallery order.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric


def retrieval_hits(sim: torch.Tensor, query_keys: torch.Tensor, gallery_keys: torch.Tensor,
                   ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """sim [Q, G], query_keys [Q], gallery_keys [G] -> hits [len(ks)] (long): queries retrieved within top-k.

    Queries with no relevant gallery item are misses.
    """
    if sim.dim() != 2 or sim.shape != (len(query_keys), len(gallery_keys)):
        raise ValueError(f"retrieval_hits: sim must be [Q, G] = [{len(query_keys)}, {len(gallery_keys)}], "
                         f"got {tuple(sim.shape)}")
    relevant = query_keys.view(-1, 1).to(sim.device) == gallery_keys.view(1, -1).to(sim.device)  # [Q, G]
    neg_inf = torch.finfo(sim.dtype).min
    best_rel = sim.masked_fill(~relevant, neg_inf).amax(dim=1, keepdim=True)  # [Q, 1]
    rank = ((sim >= best_rel) & ~relevant).sum(dim=1)  # [Q] irrelevant items at least as good
    has_rel = relevant.any(dim=1)  # [Q]
    return torch.stack([((rank < k) & has_rel).sum() for k in ks]).long()


class RetrievalRecall(Metric):
    """Recall@k for queries scored against a full gallery (each update brings its own [Q, G] block).

    DDP: states are sums, so ranks may each hold a subset of the queries against the same gallery.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1, 5), **kwargs):
        super().__init__(**kwargs)
        self.ks = tuple(int(k) for k in ks)
        self.add_state("hits", default=torch.zeros(len(self.ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, sim: torch.Tensor, query_keys: torch.Tensor | None = None,
               gallery_keys: torch.Tensor | None = None) -> None:
        """sim [Q, G]; keys default to arange (query i matches gallery item i, so Q == G)."""
        if query_keys is None or gallery_keys is None:
            if sim.shape[0] != sim.shape[1]:
                raise ValueError(f"RetrievalRecall: without keys sim must be square, got {tuple(sim.shape)}")
            query_keys = gallery_keys = torch.arange(sim.shape[0], device=sim.device)
        self.hits += retrieval_hits(sim, query_keys, gallery_keys, self.ks).to(self.hits.device)
        self.total += sim.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        denom = self.total.clamp(min=1).float()
        return {f"top{k}": self.hits[i].float() / denom for i, k in enumerate(self.ks)}


def bidirectional_recall(a: torch.Tensor, b: torch.Tensor, keys: torch.Tensor | None = None,
                         ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Paired embeddings a [N, D], b [N, D] (normalised) -> {"a2b_top1", ..., "b2a_top5"} in [0, 1].

    a2b: each row of a retrieves from all of b (argmax per row of a @ b.T); b2a: per column.
    ``keys`` [N] marks equal items (e.g. the same caption) as mutually relevant; default all distinct.
    """
    keys = torch.arange(len(a)) if keys is None else keys
    sim = a @ b.t()  # [N, N]
    out = {}
    for name, s in (("a2b", sim), ("b2a", sim.t())):
        m = RetrievalRecall(ks)
        m.update(s, keys, keys)
        out.update({f"{name}_{k}": float(v) for k, v in m.compute().items()})
    return out
