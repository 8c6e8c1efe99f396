"""Analysis of CLIP representations (TextSpan decomposition, ablation, segmentation)."""
