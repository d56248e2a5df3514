"""The discriminative PRM (Qwen2ForProcessRewardModel) against a reference built here from transformers' Qwen2Model
and the score head on the same random weights, in float64; LLM.reward / encode with vLLM's STEP pooling."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prmkern import LLM, PoolingParams, SamplingParams
from prmkern.tiny import build_prm_checkpoint

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory) -> str:
    return build_prm_checkpoint(str(tmp_path_factory.mktemp("prm") / "prm"), seed=3)


def reference_step_rewards(path: str, ids: list[int], sep_id: int) -> torch.Tensor:
    """The model card's make_step_rewards on transformers' Qwen2Model + Linear -> ReLU -> Linear, float64:
    softmax over the two labels at the positions of the separator, [num_steps, 2]."""
    import transformers

    config = transformers.Qwen2Config.from_pretrained(path)
    tensors = load_file(f"{path}/model.safetensors")
    body = transformers.Qwen2Model(config)
    body.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    h = config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
    head.load_state_dict({k[len("score."):]: v for k, v in tensors.items() if k.startswith("score.")}, strict=True)
    body, head = body.double().eval(), head.double().eval()
    with torch.no_grad():
        hidden = body(torch.tensor([ids])).last_hidden_state[0]  # [T, h]
        logits = head(hidden)  # [T, 2]
    mask = torch.tensor(ids) == sep_id
    return torch.softmax(logits, dim=-1)[mask]


def conversation(tok, problem: str, steps: list[str]) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return tok.encode(text, add_special_tokens=False)


SOLUTIONS = [("What is 13 - 5 + 10?", ["13 minus 5 is 8.", "8 plus 10 is 19.", "The answer is 19."]),
             ("What is 13 - 5 + 10?", ["13 minus 5 is 8.", "8 plus 10 is 18."]),
             ("Compute 2 + 3 then double it.", ["2 plus 3 is 5.", "5 times 2 is 10.", "So \\boxed{10}."])]


@pytest.mark.parametrize("backend,block_size,batched", [("torch", 16, 4096), ("torch", 8, 24), ("cpp", 16, 4096)])
def test_reward_matches_transformers(prm_dir, backend, block_size, batched):
    """Several solutions (two share a problem: the prefix cache skips it) and, with 24 tokens per step, a prefill
    chunked across steps: every step reward equals the float64 reference."""
    llm = LLM(prm_dir, device="cpu", dtype="float32", attention_backend=backend, block_size=block_size,
              max_num_batched_tokens=batched)
    sep = llm.tokenizer.convert_tokens_to_ids("<extra_0>")
    prompts = [conversation(llm.tokenizer, p, s) for p, s in SOLUTIONS]
    outs = llm.reward(prompts)
    for (problem, steps), ids, out in zip(SOLUTIONS, prompts, outs):
        assert out.error is None
        ref = reference_step_rewards(prm_dir, ids, sep)
        assert out.outputs.data.shape == (len(steps), 2) == ref.shape
        assert out.pooled_positions == [i for i, t in enumerate(ids) if t == sep]
        err = (out.outputs.data.double() - ref).abs().max().item()
        assert err < 1e-5, err
    assert llm.stats.cached_tokens > 0  # the second solution's problem prefix came from the cache
    assert llm.stats.generated_tokens == 0


def test_encode_every_position_and_columns(prm_dir):
    """step_tag_id=-1 pools every position; returned_token_ids keeps columns before the softmax (vLLM's order);
    use_activation=False gives the raw logits."""
    llm = LLM(prm_dir, device="cpu", dtype="float32")
    ids = conversation(llm.tokenizer, *SOLUTIONS[0])
    [allpos] = llm.encode([ids], PoolingParams(step_tag_id=-1, use_activation=False))
    assert allpos.outputs.data.shape == (len(ids), 2)
    [steps] = llm.encode([ids])
    sep = llm.tokenizer.convert_tokens_to_ids("<extra_0>")
    mask = torch.tensor(ids) == sep
    assert torch.equal(torch.softmax(allpos.outputs.data[mask], -1), steps.outputs.data)
    [one] = llm.encode([ids], PoolingParams(returned_token_ids=[1]))
    assert torch.equal(one.outputs.data, torch.ones(3, 1))  # softmax over one kept column


def test_prm_errors(prm_dir, qwen2_dir):
    llm = LLM(prm_dir, device="cpu", dtype="float32")
    [out] = llm.generate(["2 plus 3"], SamplingParams(max_tokens=2))
    assert out.error is not None and "reward()" in out.error
    bad, good = llm.encode([[5, 6, 3], [5, 6, 3]], [PoolingParams(returned_token_ids=[2]), PoolingParams()])
    assert "returned_token_ids" in bad.error and bad.outputs.data.numel() == 0
    assert good.error is None and good.outputs.data.shape == (1, 2)
    with pytest.raises(ValueError, match="step_tag_id"):
        PoolingParams(step_tag_id=-5)
    with pytest.raises(ValueError, match="pooling model"):
        LLM(qwen2_dir, device="cpu").reward(["hi"])


def test_qwen_prm_format_renders_the_model_card(prm_dir):
    """formats.QWEN_PRM renders a record exactly as the model card builds its conversation."""
    from prmkern.verify.formats import QWEN_PRM
    llm_tok = LLM(prm_dir, device="cpu", dtype="float32").tokenizer
    problem, steps = SOLUTIONS[0]
    text = QWEN_PRM.render(problem, steps, llm_tok)
    assert llm_tok.encode(text, add_special_tokens=False) == conversation(llm_tok, problem, steps)


def test_verify_qwen_prm_rows(prm_dir):
    """--format qwen-prm through the Verifier: step scores are the pooled P(correct) of the float64 reference at
    each step; the solution score, earliest error and rows follow the generative formats' rules."""
    from prmkern.verify.protocols import Verifier, VerifyConfig
    llm = LLM(prm_dir, device="cpu", dtype="float32")
    sep = llm.tokenizer.convert_tokens_to_ids("<extra_0>")
    records = [{"problem": p, "steps": s} for p, s in SOLUTIONS] + [{"problem": "x", "steps": ["a<extra_0>b"]}]
    results = Verifier(llm, VerifyConfig(format="qwen-prm", method="min", threshold=0.5)).verify(records)
    for (problem, steps), res in zip(SOLUTIONS, results):
        ids = conversation(llm.tokenizer, problem, steps)
        ref = reference_step_rewards(prm_dir, ids, sep)[:, 1].tolist()
        got = [s.score for s in res.scores.steps]
        assert got == pytest.approx(ref, abs=1e-5)
        assert res.scores.score == min(got)
        below = [i for i, p in enumerate(got) if p < 0.5]
        assert res.prediction == (below[0] if below else -1)
        row = res.to_json(llm.tokenizer, include_chains=False)
        assert row["step_coverage"] == [1.0] * len(steps) and row["unscored_steps"] == []
    # A step's own "<extra_0>" is defused (as every format's control text): it cannot add a separator.
    assert results[-1].error is None and len(results[-1].scores.steps) == 1
    with pytest.raises(ValueError, match="qwen-prm"):
        Verifier(llm, VerifyConfig(format="prmkern"))
    with pytest.raises(ValueError, match="num_chains"):
        Verifier(llm, VerifyConfig(format="qwen-prm", num_chains=2))


def test_qwen_prm_protocol_under_the_continuous_runner(prm_dir):
    """The discriminative protocol is a coroutine like the generative ones: driven record by record by
    continuous.ContinuousRunner (pooling Rounds straight on the engine) it gives verify()'s step scores (float32: one
    record per batch here, all of them in one batch there, so the sums differ in the last bits)."""
    from prmkern.verify.continuous import ContinuousRunner
    from prmkern.verify.protocols import VerificationResult, Verifier, VerifyConfig
    llm = LLM(prm_dir, device="cpu", dtype="float32")
    v = Verifier(llm, VerifyConfig(format="qwen-prm", method="min", threshold=0.5))
    records = [{"problem": p, "steps": s} for p, s in SOLUTIONS]
    want = v.verify(records)
    results, done = {}, []

    def start(i, problem, steps):
        results[i] = VerificationResult(i, len(steps), None, [])
        return v.protocol([(i, problem, steps)], results)
    ContinuousRunner(llm.engine, max_chains=1).run(
        [(i, lambda i=i, r=r: start(i, r["problem"], r["steps"]), lambda e, i=i: done.append((i, e)))
         for i, r in enumerate(records)])
    assert sorted(done) == [(i, None) for i in range(len(records))]
    for i, w in enumerate(want):
        assert [s.score for s in results[i].scores.steps] == pytest.approx([s.score for s in w.scores.steps],
                                                                            abs=1e-6)
        assert results[i].prediction == w.prediction


def test_cli_verify_qwen_prm(prm_dir, tmp_path):
    """`prmkern verify --model PRM` picks qwen-prm from config.json and writes the generative formats' rows."""
    import json
    import subprocess
    import sys
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"problem": p, "steps": s, "label": -1}) + "\n" for p, s in SOLUTIONS))
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "prmkern", "verify", str(src), "--model", prm_dir, "--device", "cpu",
                        "--dtype", "float32", "-o", str(out), "--summary", str(tmp_path / "s.json"), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(row["step_scores"]) for row in rows] == [len(s) for _, s in SOLUTIONS]
    assert all(row["error"] is None and row["method"] == "min" for row in rows)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["labels"]["solutions"] == 3 and summary["engine"]["generated_tokens"] == 0


def test_server_pooling_and_verify(prm_dir):
    """/pooling answers in vLLM's shape with LLM.reward's rows; /v1/verify runs qwen-prm on the same engine."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from prmkern.serve.app import ServerConfig, build_app
    from prmkern.serve.background import serve_in_thread
    from prmkern.verify.protocols import VerifyConfig
    offline = LLM(prm_dir, device="cpu", dtype="float32")
    ids = conversation(offline.tokenizer, *SOLUTIONS[0])
    [ref] = offline.reward([ids])
    app = build_app(LLM(prm_dir, device="cpu", dtype="float32"),
                    ServerConfig(model_name="prm", verify=VerifyConfig(format="qwen-prm")))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/pooling", json={"model": "prm", "input": [ids, ids[:5]]})
        assert r.status_code == 200, r.text
        body = r.json()
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": SOLUTIONS[0][0]},
                {"role": "assistant", "content": "<extra_0>".join(SOLUTIONS[0][1]) + "<extra_0>"}]
        chat = c.post("/pooling", json={"messages": msgs}).json()
        v = c.post("/v1/verify", json={"problem": SOLUTIONS[0][0], "steps": SOLUTIONS[0][1]}).json()
        bad = c.post("/pooling", json={"input": "x", "returned_token_ids": [7]})
        both = c.post("/pooling", json={"input": "x", "messages": msgs})
        gen = c.post("/v1/completions", json={"prompt": "2 plus", "max_tokens": 2})
    assert body["object"] == "list" and body["id"].startswith("pool-") and body["model"] == "prm"
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "pooling"
    assert body["data"][0]["data"] == ref.outputs.data.tolist()
    assert body["data"][1]["data"] == []  # no separator among the first five tokens
    assert body["usage"] == {"prompt_tokens": len(ids) + 5, "total_tokens": len(ids) + 5, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    assert chat["data"][0]["data"] == ref.outputs.data.tolist()
    assert v["format"] == "qwen-prm" and v["step_scores"] == pytest.approx(ref.outputs.data[:, 1].tolist(), abs=1e-6)
    assert bad.status_code == 400 and "returned_token_ids" in bad.json()["error"]["message"]
    assert both.status_code == 400 and gen.status_code == 400 and "reward" in gen.json()["error"]["message"]
