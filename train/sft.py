"""Supervised fine-tuning of a generative verifier: one script, read top to bottom like a recipe.

    python train/sft.py --train chains.jsonl --eval heldout.jsonl --tokenizer tok/ --out ckpt/   # from scratch
    python train/sft.py --train chains.jsonl --init some-hf-checkpoint/ --lora-r 16 --out ckpt/   # LoRA
    python train/sft.py --resume ckpt/                                                            # continue
    torchrun --nproc_per_node 2 train/sft.py ...                                                  # data parallel

Records are {problem, steps, chain} JSONL (train/data.py renders the prompt and masks it out of the loss). The loop:
length-bucketed micro-batches, gradient accumulation, AdamW (weight decay on matrices only) with linear warm-up then
cosine decay (or constant), gradient clipping, bf16 autocast on a GPU (fp32 master weights), periodic eval loss,
checkpoints. A checkpoint directory is a Hugging Face model (model.safetensors, config.json, tokenizer files; with
LoRA the adapters are merged into the weights) plus `train_state.pt`: the arguments, model state (the LoRA
parameters only, when LoRA), optimizer, scheduler, step, RNG states and data position, so `--resume` continues
exactly where an uninterrupted run would be. Under torchrun every rank trains on its own share of each step's
batches (DDP averages the gradients); rank 0 alone logs, evaluates and saves.

It does not: pack sequences, shard the model (FSDP/ZeRO), or compute verifier metrics (train/evaluate.py does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import BucketedBatches, collate, encode, read_records  # noqa: E402
from lora import apply_lora, lora_state_dict, merged_state_dict  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", help="training JSONL ({problem, steps, chain} records)")
    ap.add_argument("--eval", default=None, help="eval JSONL for the periodic eval loss")
    ap.add_argument("--out", help="checkpoint directory (Hugging Face format + train_state.pt)")
    ap.add_argument("--resume", default=None, help="checkpoint directory to continue from (its stored arguments)")
    # model: either --init (an HF checkpoint) or a fresh Qwen2 from these sizes and --tokenizer
    ap.add_argument("--init", default=None, help="Hugging Face checkpoint to fine-tune")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a model trained from scratch")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = full fine-tune")
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    # optimisation
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16, help="micro-batch size per rank")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--max-len", type=int, default=512, help="drop longer examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    # every so often
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--stop-after", type=int, default=0,
                    help="exit after this many steps as if killed (the schedule still targets --max-steps)")
    ap.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the exported model.safetensors (resume state keeps fp32 either way)")
    args = ap.parse_args(argv)
    if args.resume is None:
        missing = [f"--{k}" for k in ("train", "out") if getattr(args, k) is None]
        if missing:
            ap.error(f"{' and '.join(missing)} required unless --resume is given")
        if args.init is None and args.tokenizer is None:
            ap.error("give --init (an HF checkpoint) or --tokenizer (to train a fresh model)")
    return args


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Multiplier on --lr at `step`: linear warm-up, then cosine to --min-lr-ratio (or constant)."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(args: argparse.Namespace, tokenizer, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if args.init is not None:
        return Qwen2ForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(device)
    im_end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_positions,
                         tie_word_embeddings=False, eos_token_id=im_end, pad_token_id=pad, bos_token_id=None,
                         attention_dropout=0.0)
    config.architectures = ["Qwen2ForCausalLM"]
    return Qwen2ForCausalLM(config).to(device)


def save_checkpoint(path: str, model, tokenizer, args, state: dict) -> None:
    """Writes the HF model (merged when LoRA) and train_state.pt to a temporary directory, then swaps it in."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = getattr(torch, args.save_dtype)
    sd = merged_state_dict(model) if args.lora_r else model.state_dict()
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}
    model.save_pretrained(tmp, state_dict=sd)
    with open(os.path.join(tmp, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = args.save_dtype  # what the weights hold, so loaders pick it up as "auto"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tokenizer.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    resume_state, resume_dir = None, args.resume
    if args.resume is not None:
        resume_state = torch.load(os.path.join(args.resume, "train_state.pt"), weights_only=False)
        stop_after = args.stop_after
        args = argparse.Namespace(**resume_state["args"])
        args.stop_after = stop_after  # the only flag a resumed run takes from its own command line

    # ---- distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ddp:
        import torch.distributed as dist
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    # ---- tokenizer, model, optional LoRA
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.init or args.tokenizer)
    model = build_model(args, tokenizer, device)
    if args.lora_r:
        apply_lora(model, args.lora_r, args.lora_alpha)
    if resume_state is not None:
        if args.lora_r:
            model.load_state_dict(resume_state["model"], strict=False)
        else:
            model.load_state_dict({k: v.to(device) for k, v in resume_state["model"].items()})
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {sum(p.numel() for p in params) / 1e6:.2f}M trainable, "
        f"device {device}, world {world}")
    train_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- data
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    train = [e for e in (encode(tokenizer, r, args.max_len) for r in read_records(args.train)) if e is not None]
    evals = [e for e in (encode(tokenizer, r, args.max_len) for r in read_records(args.eval))
             if e is not None] if args.eval else []
    batches = BucketedBatches([len(e["input_ids"]) for e in train], args.batch_size, args.seed)
    rounds_per_epoch = len(batches.batches(0)) // world
    if rounds_per_epoch == 0:
        raise ValueError(f"{len(train)} training examples make fewer micro-batches than ranks ({world}); "
                         f"accepted: at least batch_size * world examples")
    log(f"data: {len(train)} train examples ({rounds_per_epoch} rounds/epoch), {len(evals)} eval examples")

    # ---- optimiser and schedule
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, args.beta2),
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    step, epoch, cursor = 0, 0, 0  # cursor: rounds (world micro-batches each) consumed in this epoch
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        step, epoch, cursor = resume_state["step"], resume_state["epoch"], resume_state["cursor"]
        torch.set_rng_state(resume_state["rng"]["torch"])
        random.setstate(resume_state["rng"]["python"])
        np.random.set_state(resume_state["rng"]["numpy"])
        log(f"resumed from {resume_dir} at step {step} (epoch {epoch}, round {cursor})")
    epoch_batches = batches.batches(epoch)

    def next_batch() -> dict[str, torch.Tensor]:
        nonlocal epoch, cursor, epoch_batches
        if cursor >= rounds_per_epoch:
            epoch, cursor = epoch + 1, 0
            epoch_batches = batches.batches(epoch)
        idx = epoch_batches[cursor * world + rank]
        cursor += 1
        return {k: v.to(device) for k, v in collate([train[i] for i in idx], pad_id).items()}

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())

    def token_loss_sum(m, b: dict[str, torch.Tensor]) -> torch.Tensor:
        # logits [B, T, V]; predict token t+1 from position t; sum of cross-entropy over unmasked targets
        with autocast:
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")

    @torch.no_grad()
    def eval_loss() -> float:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(evals), args.batch_size):
            b = {k: v.to(device) for k, v in collate(evals[i:i + args.batch_size], pad_id).items()}
            total += token_loss_sum(model, b).item()
            count += int((b["labels"][:, 1:] != -100).sum())
        model.train()
        return total / max(1, count)

    def state() -> dict:
        return {"args": vars(args), "model": lora_state_dict(model) if args.lora_r else model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "epoch": epoch,
                "cursor": cursor, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                          "numpy": np.random.get_state()}}

    def checkpoint() -> None:
        if master:
            save_checkpoint(args.out, model, tokenizer, args, state())
            log(f"step {step}: saved {args.out}")
        if ddp:
            torch.distributed.barrier()

    # ---- the loop
    model.train()
    history: list[dict] = []
    t0, tokens_seen, start_step = time.time(), 0, step
    while step < args.max_steps:
        micro = [next_batch() for _ in range(args.grad_accum)]
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)  # this rank's target tokens
        loss_sum = 0.0
        for i, b in enumerate(micro):
            sync = not ddp or i == len(micro) - 1
            with (nullcontext() if sync else train_model.no_sync()):
                loss = token_loss_sum(train_model, b) / n_tok
                loss.backward()
            loss_sum += loss.item()
            tokens_seen += int(b["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip) if args.clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.max_steps:
            dt = time.time() - t0
            rec = {"step": step, "loss": round(loss_sum, 4), "lr": sched.get_last_lr()[0],
                   "grad_norm": round(float(grad_norm), 3), "tok_per_s": round(tokens_seen * world / dt, 1),
                   "elapsed_s": round(dt, 1)}
            history.append(rec)
            log(json.dumps(rec), flush=True)
        if evals and master and (step % args.eval_every == 0 or step == args.max_steps):
            ev = eval_loss()
            history.append({"step": step, "eval_loss": round(ev, 4)})
            log(json.dumps(history[-1]), flush=True)
        if step % args.save_every == 0 or step == args.max_steps:
            checkpoint()
        if args.stop_after and step - start_step >= args.stop_after and step < args.max_steps:
            log(f"step {step}: stopping as asked (--stop-after {args.stop_after})")
            break
    if ddp:
        torch.distributed.destroy_process_group()
    return {"step": step, "history": history}


if __name__ == "__main__":
    main()
