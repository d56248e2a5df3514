"""A small byte-level BPE tokenizer trained locally (with `tokenizers`) on the synthetic verification corpus.

Digits are split one per token (as Qwen2 does), so a small model learns arithmetic digit by digit and a number's
tokens do not depend on its neighbours. The saved directory is a Hugging Face tokenizer (tokenizer.json,
tokenizer_config.json) with a ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`); `<|im_end|>` ends an
assistant turn and `<|endoftext|>` pads. Vocabulary ~1K keeps the embedding tables of a tiny model small.

It does not: download anything, or guarantee good compression on text unlike the corpus (bytes always encode).
"""
from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# GPT-2's split with numbers cut into single digits (\p{N} without '+').
SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024):
    """Trains the BPE on `texts`, saves a Hugging Face tokenizer to `out_dir`, returns it (PreTrainedTokenizerFast)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size!r}; accepted: an int >= {256 + len(SPECIAL_TOKENS)} "
                         f"(the byte alphabet plus the special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


if __name__ == "__main__":
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from data import corpus_texts
    from synthetic import make_dataset

    ap = argparse.ArgumentParser(description="Train the synthetic-task BPE tokenizer.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--n", type=int, default=4000, help="synthetic examples in the training corpus")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train_tokenizer(corpus_texts(make_dataset(args.n, args.seed)), args.out, args.vocab_size)
