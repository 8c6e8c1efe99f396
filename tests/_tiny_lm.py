"""A local byte-level BPE tokenizer + randomly initialised GPT-2 for ZeroCap tests (no download, ~1 s)."""
from __future__ import annotations

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
