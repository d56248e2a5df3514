"""The discriminative baseline: the same Qwen2 backbone with a per-step classification head, trained on the same labels.

Input: the problem, then each step as "Step k: text" followed by a newline token; that newline is the step's
separator and the head (transformers' Qwen2ForTokenClassification, 2 classes) reads its hidden state. Labels are
ProcessBench's: steps before the first error are correct (1), the first wrong step is incorrect (0), later steps
are not trained on (-100), as in PRM800K-style first-error supervision. `step_probabilities` returns P(correct) per
step; the earliest error is the first step below a threshold (prmkern.verify.scoring.earliest_error).

    python train/discriminative.py --train train.jsonl --eval eval.jsonl --tokenizer tok/ --out disc/

It does not: resume, run under DDP or use LoRA (train/sft.py shows those; this loop stays a short baseline).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import IGNORE, BucketedBatches, read_records  # noqa: E402


def encode_steps(tokenizer, problem: str, steps: list[str], label: int | None = None,
                 ) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, separator positions [num_steps], token labels) for one solution; labels all -100 if label is None."""
    if not steps:
        raise ValueError("steps must be a non-empty list of str")
    nl = tokenizer.encode("\n", add_special_tokens=False)
    ids = tokenizer.encode(problem.strip(), add_special_tokens=False) + nl
    seps = []
    for k, s in enumerate(steps):
        ids += tokenizer.encode(f"Step {k + 1}: {s.strip()}", add_special_tokens=False) + nl
        seps.append(len(ids) - 1)
    labels = [IGNORE] * len(ids)
    if label is not None:
        if not -1 <= label < len(steps):
            raise ValueError(f"label={label}; accepted: -1 or a step index in [0, {len(steps)})")
        for k, pos in enumerate(seps):
            if label == -1 or k < label:
                labels[pos] = 1
            elif k == label:
                labels[pos] = 0
    return ids, seps, labels


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def step_probabilities(model, tokenizer, records: list[dict], batch_size: int = 32) -> list[list[float]]:
    """P(correct) at each step separator, per record."""
    model.eval()
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    out: list[list[float]] = []
    for i in range(0, len(records), batch_size):
        enc = [encode_steps(tokenizer, r["problem"], r["steps"]) for r in records[i:i + batch_size]]
        b = _collate([(ids, [IGNORE] * len(ids)) for ids, _, _ in enc], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [B, T, 2]
        p = logits.float().softmax(-1)[..., 1]  # [B, T]
        out += [[float(p[j, pos]) for pos in seps] for j, (_, seps, _) in enumerate(enc)]
    return out


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForTokenClassification

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True, help="JSONL with problem, steps, label")
    ap.add_argument("--eval", default=None)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=1024, num_labels=2,
                         pad_token_id=pad_id, tie_word_embeddings=False, attention_dropout=0.0)
    config.architectures = ["Qwen2ForTokenClassification"]
    model = Qwen2ForTokenClassification(config)
    train = [encode_steps(tokenizer, r["problem"], r["steps"], r["label"]) for r in read_records(args.train)]
    rows = [(ids, labels) for ids, _, labels in train]
    batches = BucketedBatches([len(ids) for ids, _ in rows], args.batch_size, args.seed)
    print(f"discriminative: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(rows)} training solutions", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99))

    def lr_factor(s: int) -> float:
        if s < args.warmup:
            return (s + 1) / args.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - args.warmup) / max(1, args.max_steps - args.warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    epoch, order, t0, history = 0, batches.batches(0), time.time(), []
    for step in range(1, args.max_steps + 1):
        if not order:
            epoch += 1
            order = batches.batches(epoch)
        b = _collate([rows[i] for i in order.pop()], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [B, T, 2]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(),
                                                 ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.max_steps:
            history.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0, 1)})
            print(json.dumps(history[-1]), flush=True)
    if args.eval:
        from prmkern.verify.processbench import processbench_f1
        from prmkern.verify.scoring import earliest_error
        recs = read_records(args.eval)
        preds = [earliest_error(p, 0.5) for p in step_probabilities(model, tokenizer, recs)]
        res = processbench_f1([r["label"] for r in recs], preds)
        print(json.dumps({"eval_f1": round(res.f1, 4), "acc_err": round(res.acc_err, 4),
                          "acc_ok": round(res.acc_ok, 4)}), flush=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    return {"history": history}


if __name__ == "__main__":
    main()
