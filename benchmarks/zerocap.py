"""ZeroCap speed: seconds per caption, the share spent in CLIP vs the LM, and the speed-up of memoising CLIP text
features across iterations/beams vs re-encoding every candidate string every iteration (the anchor's way).

    python benchmarks/zerocap.py                 # tiny CLIP + 4-layer GPT-2 (random), anchor search sizes
    python benchmarks/zerocap.py --layers 12 --width 768 --backbone ViT-B-32   # GPT-2-small/ViT-B-32 shapes
"""
import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from xclip.datamodules.synthetic_world import COLOURS, SHAPES
    from xclip.datamodules.text_render import load_word_list

    rng = random.Random(0)
    words = load_word_list()
    corpus = [f"Image of a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)} {rng.choice(words)}." for _ in range(5000)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="tiny-vit-world")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--top", type=int, default=512)
    args = p.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    from xclip.generation.zerocap import ZeroCap, ZeroCapConfig
    from xclip.models.clip_backbone import build_clip

    torch.manual_seed(0)
    tok = tiny_tokenizer(args.vocab)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=args.width, n_layer=args.layers,
                                    n_head=max(1, args.width // 64), bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id)).eval()
    clip = build_clip(args.backbone)
    cfg = ZeroCapConfig(beam_size=args.beam, top_size=args.top, target_seq_length=args.tokens, end_factor=0.5)
    target = torch.nn.functional.normalize(torch.randn(clip.embed_dim), dim=0)
    times = {}
    for memo in (False, True):
        zc = ZeroCap(clip, lm, tok, cfg, memoize_clip_text=memo)
        t0 = time.perf_counter()
        caps = zc.caption(target)
        times[memo] = (time.perf_counter() - t0, dict(zc.timing), caps[0].text)
    for memo, (total, timing, text) in times.items():
        name = "memoised CLIP text (ours)" if memo else "re-encode every iteration (anchor)"
        print(f"{name:38s}: {total:7.2f} s/caption  CLIP {timing['clip'] / total:5.1%}  LM {timing['lm'] / total:5.1%}"
              f"  ({args.tokens} tokens, beam {args.beam}, top {args.top}) -> {text!r}")
    print(f"speed-up of memoisation: {times[False][0] / times[True][0]:.2f}x (same captions: "
          f"{times[False][2] == times[True][2]})")


if __name__ == "__main__":
    main()
