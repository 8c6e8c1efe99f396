"""A local byte-level BPE tokenizer + randomly initialised GPT-2 for ZeroCap tests (no download, ~1 s).

The builder lives in the package (generation/world_lm.py) because `xclip reproduce --parts zerocap` uses it too."""
from xclip.generation.world_lm import random_gpt2, world_lm

__all__ = ["random_gpt2", "world_lm"]
