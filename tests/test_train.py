"""Tests of train/: the synthetic task's labels (recomputed with sympy), the SFT loop (loss, exact resume, HF
round-trip through prmkern and transformers, LoRA merge, DDP), RPE label math, chain filtering, and the engine
plumbing of chain synthesis, RPE rollouts and the evaluation at tiny sizes. CPU, one thread, about a minute."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import sympy
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))

import data  # noqa: E402
import discriminative  # noqa: E402
import lora  # noqa: E402
import rpe_labels  # noqa: E402
import sft  # noqa: E402
import synthesize_chains  # noqa: E402
import synthetic  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

TINY = ["--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
        "--batch-size", "4", "--threads", "1", "--warmup", "2", "--log-every", "1", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("train")
    exs = synthetic.make_dataset(48, seed=7)
    synthetic.write_jsonl(exs, str(d / "train.jsonl"))
    synthetic.write_jsonl(synthetic.make_dataset(8, seed=8), str(d / "eval.jsonl"))
    train_tokenizer(data.corpus_texts(synthetic.make_dataset(300, seed=7)), str(d / "tok"), 512)
    return d


@pytest.fixture(scope="module")
def tiny_ckpt(work):
    """A 6-step full fine-tune (also the uninterrupted half of the resume test)."""
    out = work / "full"
    sft.main(["--train", str(work / "train.jsonl"), "--tokenizer", str(work / "tok"), "--out", str(out),
              "--max-steps", "6", "--save-every", "3", "--grad-accum", "2", *TINY])
    return out


# ---- synthetic task ------------------------------------------------------------------------------------------

_X = sympy.Symbol("x")


def _equation(text: str) -> sympy.Eq:
    lhs, rhs = text.split("=")
    conv = lambda s: sympy.sympify(re.sub(r"(\d)x", r"\1*x", s.strip()))  # noqa: E731
    return sympy.Eq(conv(lhs), conv(rhs))


def _step_ok(rec: dict, i: int, prev_eq) -> tuple[bool, object]:
    """Recomputes step i of a record from its text alone; returns (right?, the equation it leaves, for linear)."""
    s = rec["steps"][i]
    if rec["generator"] == "synthetic-arith":
        a, op, b, c = re.match(r"Compute (\d+) ([-+*]) (\d+) = (-?\d+)\.", s).groups()
        return sympy.sympify(f"{a} {op} {b}") == int(c), None
    if rec["generator"] == "synthetic-fraction":
        if i == 0:
            n, d, g = map(int, re.match(r"The greatest common divisor of (\d+) and (\d+) is (\d+)\.", s).groups())
            return sympy.gcd(n, d) == g, None
        n, g, q = map(int, re.search(r"(\d+) / (\d+) = (-?\d+)\.", s).groups())
        return sympy.Rational(n, g) == q, None
    # linear: subtracting keeps lhs - rhs unchanged; dividing by k scales it by 1/k
    eq = _equation(re.search(r"\$([^$]*)\$", s).group(1))
    ratio = sympy.simplify((eq.lhs - eq.rhs) / (prev_eq.lhs - prev_eq.rhs))
    k = re.match(r"Divide both sides by (\d+)", s)
    return ratio == (sympy.Rational(1, int(k.group(1))) if k else 1), eq


def test_synthetic_labels_recomputed_with_sympy():
    recs = [e.record() for e in synthetic.make_dataset(300, seed=11)]
    assert {r["generator"] for r in recs} == {f"synthetic-{f}" for f in synthetic.FAMILIES}
    assert 0.3 < sum(r["label"] == -1 for r in recs) / len(recs) < 0.7
    for r in recs:
        prev = _equation(re.search(r"\$([^$]*)\$\.$", r["problem"]).group(1)) \
            if r["generator"] == "synthetic-linear" else None
        first = -1
        for i in range(len(r["steps"])):
            ok, prev = _step_ok(r, i, prev)
            if not ok:
                first = i
                break
        assert first == r["label"], r
        boxed = re.search(r"\\boxed\{(.*)\}\$\.$", r["steps"][-1]).group(1)
        if r["generator"] == "synthetic-arith":
            gold = sympy.sympify(re.match(r"Compute \$(.*)\$\.", r["problem"]).group(1))
            assert r["final_answer_correct"] == (sympy.sympify(boxed) == gold)
        elif r["generator"] == "synthetic-linear":
            root = sympy.solve(_equation(re.search(r"\$([^$]*)\$\.$", r["problem"]).group(1)), _X)[0]
            assert r["final_answer_correct"] == (sympy.Rational(boxed) == root) and str(root) == r["answer"]


def test_synthetic_deterministic_and_chains_parse():
    from prmkern.verify import PRMKERN, parse_output
    a = [e.record() for e in synthetic.make_dataset(40, seed=3)]
    assert a == [e.record() for e in synthetic.make_dataset(40, seed=3)]
    assert a != [e.record() for e in synthetic.make_dataset(40, seed=4)]
    for r in a:  # the gold chain says exactly the gold label through prmkern's parser
        parsed = parse_output(PRMKERN, r["chain"], len(r["steps"]))
        assert synthesize_chains.keep_chain(parsed, r["label"], len(r["steps"]))
    with pytest.raises(ValueError, match="p_error"):
        synthetic.make_dataset(3, seed=0, p_error=2.0)


# ---- SFT loop -------------------------------------------------------------------------------------------------

def test_prompt_is_masked(work):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    rec = data.read_records(str(work / "train.jsonl"))[0]
    enc = data.encode(tok, rec)
    n_prompt = len(tok.encode(data.render_prompt(tok, rec["problem"], rec["steps"])))
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert tok.decode(enc["labels"][n_prompt:]) == rec["chain"] + "<|im_end|>"
    with pytest.raises(ValueError, match="chain"):
        data.encode(tok, {"problem": "p", "steps": ["s"]})


def test_loss_goes_down(work):
    out = sft.main(["--train", str(work / "train.jsonl"), "--eval", str(work / "eval.jsonl"), "--tokenizer",
                    str(work / "tok"), "--out", str(work / "loss"), "--max-steps", "25", "--eval-every", "25",
                    "--save-every", "100", *TINY])
    losses = [h["loss"] for h in out["history"] if "loss" in h]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3, losses
    assert [h for h in out["history"] if "eval_loss" in h][-1]["eval_loss"] < losses[0]


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def test_resume_matches_uninterrupted(work, tiny_ckpt):
    out = work / "killed"
    common = ["--train", str(work / "train.jsonl"), "--tokenizer", str(work / "tok"), "--out", str(out),
              "--max-steps", "6", "--save-every", "3", "--grad-accum", "2", *TINY]
    assert sft.main(common + ["--stop-after", "3"])["step"] == 3
    assert sft.main(["--resume", str(out)])["step"] == 6
    a, b = _weights(tiny_ckpt), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    sa = torch.load(os.path.join(tiny_ckpt, "train_state.pt"), weights_only=False)
    sb = torch.load(os.path.join(out, "train_state.pt"), weights_only=False)
    assert (sa["step"], sa["epoch"], sa["cursor"]) == (sb["step"], sb["epoch"], sb["cursor"])


def test_checkpoint_greedy_same_in_prmkern_and_transformers(work, tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from prmkern.llm import LLM
    from prmkern.sampling_params import SamplingParams
    rec = data.read_records(str(work / "eval.jsonl"))[0]
    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    prompt = data.render_prompt(tok, rec["problem"], rec["steps"])
    ids = tok.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    llm = LLM(str(tiny_ckpt), dtype="float32", device="cpu")
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, min_tokens=16))[0].outputs[0]
    assert got.token_ids == ref.tolist()


def test_lora_merge_equivalence():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    x = torch.randint(0, 64, (2, 9))
    base = model(input_ids=x).logits
    names = lora.apply_lora(model, r=4, alpha=8.0)
    assert len(names) == 2 * 7 and not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    torch.testing.assert_close(model(input_ids=x).logits, base)  # B = 0: the wrapped model is the base
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(0, 0.2)
    adapted = model(input_ids=x).logits
    assert (adapted - base).abs().max() > 1e-2
    plain = Qwen2ForCausalLM(cfg)
    plain.load_state_dict(lora.merged_state_dict(model))
    torch.testing.assert_close(plain(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        lora.LoRALinear(torch.nn.Linear(3, 3), r=0, alpha=1.0)


def test_lora_sft_saves_merged_checkpoint_and_resumes(work, tiny_ckpt):
    from transformers import AutoModelForCausalLM
    out, killed = work / "lora", work / "lora-killed"
    common = ["--train", str(work / "train.jsonl"), "--init", str(tiny_ckpt), "--lora-r", "4", "--max-steps", "4",
              "--save-every", "2", *TINY]
    sft.main(common + ["--out", str(out)])
    before, after = _weights(tiny_ckpt), _weights(out)
    assert before.keys() == after.keys()  # no lora_A / lora_B names: merged
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed), changed
    AutoModelForCausalLM.from_pretrained(str(out))
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=False)
    assert state["model"] and all("lora_" in k for k in state["model"])  # resume state: adapters only
    sft.main(common + ["--out", str(killed), "--stop-after", "2"])
    sft.main(["--resume", str(killed)])
    for k, v in _weights(killed).items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-6, msg=k)


def test_ddp_two_ranks_gloo(work):
    out = work / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", os.path.join(ROOT, "train", "sft.py"),
                           "--train", str(work / "train.jsonl"), "--tokenizer", str(work / "tok"), "--out", str(out),
                           "--max-steps", "3", *TINY], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("model:") == 1  # rank 0 alone logs
    assert "world 2" in proc.stdout
    assert [json.loads(l)["step"] for l in proc.stdout.splitlines() if l.startswith('{"step"')] == [1, 2, 3]
    assert os.path.isfile(out / "model.safetensors")


# ---- labels from the engine -----------------------------------------------------------------------------------

def test_rpe_label_math():
    progress, labels = rpe_labels.rpe_step_labels([0.5, 0.5, 0.45, 0.25, 0.25])
    assert labels == [1, 1, 0, 1] and progress == pytest.approx([1.0, 0.9, 0.25 / 0.45, 1.0])
    # after the first state with MC = 0, every step is wrong (even if a later estimate recovers)
    assert rpe_labels.rpe_step_labels([0.75, 0.0, 0.5, 1.0]) == ([0.0, None, None], [0, 0, 0])
    assert rpe_labels.rpe_step_labels([0.0, 1.0])[1] == [0]
    assert rpe_labels.rpe_step_labels([0.5, 0.4])[1] == [1]  # P = 0.8 is on the correct side
    assert rpe_labels.first_wrong([1, 1, 0, 1]) == 2 and rpe_labels.first_wrong([1]) == -1
    with pytest.raises(ValueError, match="MC"):
        rpe_labels.rpe_step_labels([0.5, 1.5])
    with pytest.raises(ValueError):
        rpe_labels.rpe_step_labels([0.5])


class _Chain:
    def __init__(self, text: str, finish: str = "stop", n_tokens: int = 10):
        self.text, self.finish_reason, self.token_ids = text, finish, list(range(n_tokens))


class _FakeLLM:
    """generate() returns canned chains: the filter logic is tested through synthesize()'s own code path."""
    def __init__(self, tokenizer, chains: list[list[_Chain]]):
        self.tokenizer, self.chains = tokenizer, chains

    def generate(self, prompts, params):
        assert len(prompts) == len(self.chains)
        return [type("Out", (), {"error": None, "outputs": c}) for c in self.chains]


def test_chain_filter_and_balance(work):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    recs = [e.record() for e in synthetic.make_dataset(12, seed=5)]
    wrong = next(r for r in recs if r["label"] > 0)
    ok = next(r for r in recs if r["label"] == -1)
    flipped = wrong["chain"].replace("{incorrect}", "{correct}").replace("? No", "? Yes")
    chains = [[_Chain(wrong["chain"]), _Chain(wrong["chain"]), _Chain(flipped)],
              [_Chain(ok["chain"], n_tokens=500), _Chain(ok["chain"], finish="length"), _Chain(ok["chain"])]]
    kept, stats = synthesize_chains.synthesize(_FakeLLM(tok, chains), [wrong, ok], k=3, temperature=1.0,
                                               max_tokens=600, max_chain_tokens=400, per_solution=2, seed=0)
    assert [r["id"] for r in kept] == [wrong["id"], ok["id"]]
    assert stats == {"chains": 6, "kept": 2, "unfinished": 1, "too_long": 1, "disagree": 1, "duplicate": 1,
                     "over_per_solution": 0, "failed_requests": 0}
    # ThinkPRM's filter: \boxed{\text{...}} normalised, cut after the last verdict, the gold final question appended
    # (the teacher's own closing answer, here wrong, and its trailing text never reach the training chain).
    messy = (wrong["chain"].replace("\\boxed{correct}", "\\boxed{\\text{correct}}").replace("? No", "? Yes")
             + "\nAnd some rambling after the answer.")
    kept, stats = synthesize_chains.synthesize(_FakeLLM(tok, [[_Chain(messy)]]), [wrong], k=1, temperature=1.0,
                                               max_tokens=600, max_chain_tokens=400, per_solution=1, seed=0)
    assert stats["kept"] == 1 and kept[0]["chain"] == wrong["chain"]
    assert "\\text" not in kept[0]["chain"] and kept[0]["chain"].endswith("\\boxed{incorrect}\nIs the solution correct? No")
    many = [dict(ok, id=f"ok{i}") for i in range(5)] + [dict(wrong, id="w0"), dict(wrong, id="w1")]
    bal = synthesize_chains.balance(many, seed=0)
    assert sum(r["label"] == -1 for r in bal) == 2 and sum(r["label"] != -1 for r in bal) == 2


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from prmkern.tiny import build_checkpoint
    return build_checkpoint(str(tmp_path_factory.mktemp("random")), "qwen2")


def test_synthesize_and_rpe_through_the_engine(random_model):
    from prmkern.llm import LLM
    llm = LLM(random_model, dtype="float32", device="cpu")
    recs = [e.record() for e in synthetic.make_dataset(3, seed=9)]
    kept, stats = synthesize_chains.synthesize(llm, recs, k=3, temperature=1.0, max_tokens=12,
                                               max_chain_tokens=12, per_solution=1, seed=0)
    assert stats["chains"] == 9 and stats["failed_requests"] == 0
    assert stats["chains"] == sum(v for key, v in stats.items() if key not in ("chains", "failed_requests"))
    # A random policy never reaches the answer: every problem has Pass@1 = 0 and is dropped, as GenPRM's RPE does
    # (the label rules themselves: tests/test_rpe_labels.py, with a scripted policy).
    out, dropped = rpe_labels.label_records(llm, recs, n_pass=2, bands=((1.0, 2),), temperature=1.0, max_tokens=8,
                                            seed=0)
    assert out == [] and len(dropped) == 3 and all("Pass@1 = 0.0" in d["rpe_dropped"] for d in dropped)


# ---- discriminative baseline and evaluation -------------------------------------------------------------------

@pytest.fixture(scope="module")
def disc_ckpt(work):
    out = work / "disc"
    discriminative.main(["--train", str(work / "train.jsonl"), "--tokenizer", str(work / "tok"), "--out", str(out),
                         "--max-steps", "3", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                         "--intermediate", "64", "--batch-size", "4", "--threads", "1", "--warmup", "1"])
    return out


def test_discriminative_labels_and_training(work, disc_ckpt):
    from transformers import AutoTokenizer, Qwen2ForTokenClassification
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    ids, seps, labels = discriminative.encode_steps(tok, "P", ["a", "b", "c"], label=1)
    assert [labels[p] for p in seps] == [1, 0, -100] and sum(y != -100 for y in labels) == 2
    assert all(ids[p] == tok.encode("\n")[0] for p in seps)
    with pytest.raises(ValueError, match="label"):
        discriminative.encode_steps(tok, "P", ["a"], label=3)
    model = Qwen2ForTokenClassification.from_pretrained(str(disc_ckpt))
    recs = data.read_records(str(work / "eval.jsonl"))
    probs = discriminative.step_probabilities(model, tok, recs)
    assert [len(p) for p in probs] == [len(r["steps"]) for r in recs]
    assert all(0.0 <= x <= 1.0 for p in probs for x in p)


def test_evaluate_end_to_end(work, tiny_ckpt, disc_ckpt, capsys):
    res = __import__("evaluate").main(["--model", str(tiny_ckpt), "--disc", str(disc_ckpt), "--n", "4",
                                       "--k", "2", "--max-tokens", "24", "--threads", "1",
                                       "--exclude", str(work / "train.jsonl")])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.dumps(last["rows"]) == json.dumps(res["rows"]) and set(res["rows"]) == {  # F1 may be NaN
        "generative K=1", "generative K=2", "generative greedy", "discriminative", "generative K=2 @best-t",
        "discriminative @best-t"}
    assert last["n"] == 4 and 0.0 <= last["step_verdicts_right"] <= 1.0
    assert 0.0 <= last["greedy_step_verdicts_right"] <= 1.0
