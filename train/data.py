"""Training data for the verifier: prompt rendering, tokenisation with the prompt masked, length-bucketed batches.

A training record is a dict with `problem`, `steps` (list of str) and `chain` (the text the verifier writes after
the format's assistant prefix): the gold chains of train/synthetic.py and the filtered chains of
train/synthesize_chains.py both have that shape. The prompt is prmkern.verify.formats.PRMKERN rendered through the
tokenizer's chat template (ending in "Let's verify step by step:"); the target is the chain followed by the
end-of-turn token. Labels are -100 on the prompt and on padding.

`BucketedBatches` turns encoded examples into padded micro-batches: each epoch is a seeded shuffle, cut into
chunks that are sorted by length (so a batch holds similar lengths and little padding), then the batches are
shuffled again. The order depends only on (seed, epoch), so a loop that stores (epoch, index) resumes exactly.

It does not: pack several examples into one row (bucketing keeps attention simple and exact), or stream data larger
than memory.
"""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

IGNORE = -100
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing prmkern
    sys.path.insert(0, _ROOT)


def render_prompt(tokenizer, problem: str, steps: list[str]) -> str:
    """The verifier's prompt text: ThinkPRM's user turn through the chat template, plus the assistant prefix."""
    from prmkern.verify.formats import PRMKERN
    return PRMKERN.render(problem, steps, tokenizer)


def corpus_texts(examples: Iterable) -> Iterator[str]:
    """Texts for tokenizer training: the rendered prompt (chat markup included) followed by the chain."""
    from prmkern.verify.formats import PRMKERN, render_messages
    from tokenizer import CHAT_TEMPLATE

    class _Template:  # renders the chat template before a tokenizer exists
        chat_template = CHAT_TEMPLATE

        @staticmethod
        def apply_chat_template(messages, add_generation_prompt, tokenize):
            import jinja2
            return jinja2.Template(CHAT_TEMPLATE).render(messages=messages,
                                                         add_generation_prompt=add_generation_prompt)

    for ex in examples:
        rec = ex.record() if hasattr(ex, "record") else ex
        msgs = PRMKERN.messages(rec["problem"], rec["steps"])
        yield render_messages(msgs, _Template) + PRMKERN.prefix() + rec["chain"] + "<|im_end|>"


def encode(tokenizer, record: dict, max_len: int | None = None) -> dict | None:
    """{input_ids, labels} for one record, or None when longer than max_len (dropped, not truncated: a cut chain
    would teach the model to stop mid-verdict)."""
    for key in ("problem", "steps", "chain"):
        if key not in record:
            raise ValueError(f"training record lacks {key!r}; it has {sorted(record)}; accepted: problem, steps, chain")
    prompt = tokenizer.encode(render_prompt(tokenizer, record["problem"], record["steps"]), add_special_tokens=False)
    target = tokenizer.encode(record["chain"], add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = prompt + target
    if max_len is not None and len(ids) > max_len:
        return None
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt) + target}


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, labels, attention_mask, each [batch, max_len]."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class BucketedBatches:
    """Deterministic length-bucketed micro-batches. `batches(epoch)` lists index lists for that epoch."""
    lengths: list[int]
    batch_size: int
    seed: int
    chunk: int = 64  # batches per sorting chunk

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}; accepted: an int >= 1")
        if not self.lengths:
            raise ValueError("no training examples (all dropped by max_len, or an empty file)")

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        out: list[list[int]] = []
        span = self.batch_size * self.chunk
        for start in range(0, len(order), span):
            part = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            out.extend(part[j:j + self.batch_size] for j in range(0, len(part), self.batch_size))
        rng.shuffle(out)
        return out
