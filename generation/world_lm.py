"""A tiny local language model for ZeroCap on the built-in world (no download): a byte-level BPE tokenizer and a
randomly initialised GPT-2 (``random_gpt2``), optionally trained for a few seconds on world captions
(``world_lm``). This is what the ZeroCap tests use offline (tests/test_zerocap.py) and what ``xclip reproduce
--parts zerocap`` captions with: the world has no real LM, so fluency is not the point, CLIP guidance is.
"""
from __future__ import annotations

import random
from typing import Iterable

import torch


def random_gpt2(corpus: Iterable[str], vocab_size: int = 300, n_embd: int = 32, n_layer: int = 1):
    """(GPT2LMHeadModel with seed-0 weights, PreTrainedTokenizerFast trained on ``corpus``), BOS = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(corpus), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    return lm, tok


def world_captions(n: int, seed: int = 0) -> list[str]:
    """World captions in two word orders, so that after "Image of a" both a colour and a shape are fluent."""
    from xclip.datamodules.synthetic_world import COLOURS, SHAPES

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        out.append(f"Image of a {colour} {shape}." if rng.random() < 0.5 else f"Image of a {shape} in {colour}.")
    return out


def world_lm(steps: int = 60, batch_size: int = 64, lr: float = 3e-3):
    """A 2-layer GPT-2 (64 wide, 400-token BPE) trained ``steps`` AdamW steps on world captions: (lm.eval(), tok).

    Deterministic (seeded corpus, weights and batches via torch's global RNG after ``random_gpt2`` seeds it)."""
    lm, tok = random_gpt2(world_captions(2000) + ["Image of 1 2 3 (x), y: z!"], vocab_size=400, n_embd=64, n_layer=2)
    ids = [[tok.bos_token_id] + tok.encode(c) for c in world_captions(512, seed=1)]
    L = max(map(len, ids))
    batch = torch.tensor([x + [tok.eos_token_id] * (L - len(x)) for x in ids])      # [512, L]
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    for _ in range(steps):
        b = batch[torch.randint(0, len(batch), (batch_size,))]
        loss = lm(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval(), tok
