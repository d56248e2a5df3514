"""Every engine flag behaves identically in verify, generate, eval processbench, bon and serve (prmkern/cli/options.py).

The flags are enumerated here, each with a value that is not its default; a test fails when EngineConfig gains a
field this list does not name. Each command is run through `main` up to the point where it builds its LLM (a fake
that records its arguments), so the check covers each command's own path from argv to `LLM(...)`; a real LLM then
shows that those arguments reach EngineConfig unchanged. `serve --tensor-parallel-size 2` is run for real: its
engine has two ranks and answers a completion with the single-process engine's tokens.
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from prmkern import LLM, SamplingParams
from prmkern.attention.backend import backend_names
from prmkern.cli import main, options
from prmkern.cli.entry import build_parser
from prmkern.config import EngineConfig

GiB = 1 << 30
# dest -> (argv words, the value LLM receives)
FLAGS = {
    "dtype": (["--dtype", "float32"], "float32"),
    "device": (["--device", "cpu"], "cpu"),
    "block_size": (["--block-size", "8"], 8),
    "num_kvcache_blocks": (["--num-kvcache-blocks", "96"], 96),
    "kv_cache_memory": (["--kv-cache-memory", "2GiB"], 2 * GiB),
    "gpu_memory_utilization": (["--gpu-memory-utilization", "0.5"], 0.5),
    "max_num_seqs": (["--max-num-seqs", "7"], 7),
    "max_num_batched_tokens": (["--max-num-batched-tokens", "96"], 96),
    "max_model_len": (["--max-model-len", "80"], 80),
    "enable_prefix_caching": (["--no-enable-prefix-caching"], False),
    "attention_backend": (["--attention-backend", "cpp"], "cpp"),
    "seed": (["--seed", "11"], 11),
    "enforce_eager": (["--enforce-eager"], True),
    "max_graph_batch": (["--max-graph-batch", "4"], 4),
    "packed_gemm_bytes": (["--packed-gemm-bytes", "0"], 0),
    "tensor_parallel_size": (["--tensor-parallel-size", "2"], 2),
}
THREADS = 3  # --threads: this process's torch threads, set before the LLM is built


class Built(Exception):
    """Raised by the fake LLM: the command got as far as building its engine."""


def _inputs(tmp_path) -> dict[str, list[str]]:
    solution = {"problem": "What is 1 + 1?", "steps": ["1 + 1 = 2.", "The answer is 2."], "label": -1,
                "answer": "2"}
    sol = tmp_path / "solutions.jsonl"
    sol.write_text(json.dumps(solution) + "\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2, 3]}) + "\n")
    return {"generate": ["generate", str(prompts)], "verify": ["verify", str(sol)],
            "eval": ["eval", "processbench", str(sol)], "bon": ["bon", str(sol)], "serve": ["serve", "--port", "0"]}


def test_the_flag_list_covers_every_engine_option():
    declared = {f.name for f in options.ENGINE_FIELDS} | {"dtype", "device"} | \
        {dest for dest, _, _ in options.PROCESS_OPTIONS}
    assert declared == set(FLAGS) | {"threads"}
    assert {f.name for f in dataclasses.fields(EngineConfig)} == declared - {"threads", "tensor_parallel_size"} | {
        "model"}


def test_defaults_are_written_once(tmp_path):
    """The parser's and LLM's defaults are EngineConfig's."""
    args = build_parser().parse_args(["verify", "x"])
    sig = inspect.signature(LLM.__init__).parameters
    for f in options.ENGINE_FIELDS:
        assert getattr(args, f.name) == f.default == sig[f.name].default, f.name


def test_every_engine_flag_reaches_the_llm_identically_in_every_command(tmp_path, monkeypatch, qwen2_dir):
    pytest.importorskip("uvicorn")
    built: dict[str, tuple] = {}
    threads: list[int] = []

    def fake_llm(model, **kwargs):
        built[command] = (model, kwargs)
        raise Built

    monkeypatch.setattr(options, "LLM", fake_llm)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    argv = ["--model", qwen2_dir, "--threads", str(THREADS)] + [w for words, _ in FLAGS.values() for w in words]
    for command, words in _inputs(tmp_path).items():
        with pytest.raises(Built):
            main([*words, *argv])
    expected = (qwen2_dir, {dest: value for dest, (_, value) in FLAGS.items()})
    assert set(built) == {"generate", "verify", "eval", "bon", "serve"}
    for command, got in built.items():
        assert got == expected, command
    assert threads == [THREADS] * 5


def test_the_flags_reach_engine_config_unchanged(qwen2_dir):
    """LLM hands every flag's value to EngineConfig as it is (the tensor-parallel size is the executor's)."""
    kwargs = {dest: value for dest, (_, value) in FLAGS.items() if dest not in ("tensor_parallel_size",
                                                                                  "gpu_memory_utilization")}
    kwargs["attention_backend"] = "torch"  # every build has it; cpp needs prmkern._C
    with pytest.warns(UserWarning, match="gpu_memory_utilization"):
        llm = LLM(qwen2_dir, gpu_memory_utilization=0.5, **kwargs)  # ignored on the CPU, with a warning
    for dest, value in kwargs.items():
        if dest == "dtype":
            assert llm.config.dtype == torch.float32
        elif dest == "device":
            assert llm.config.device == torch.device("cpu")
        else:
            assert getattr(llm.config, dest) == value, dest
    assert llm.engine.num_blocks == 96 and llm.engine.max_model_len == 80


@pytest.mark.parametrize("name", backend_names())
def test_every_registered_backend_is_accepted_before_the_model_loads(name):
    """`--attention-backend cpp` (the CPU default) was refused once: the accepted names are the registry's."""
    args = build_parser().parse_args(["verify", "x", "--attention-backend", name])
    options.check_engine_args(args)
    assert {"torch", "cpp"} <= set(backend_names())


def test_an_unknown_backend_names_the_registry():
    args = build_parser().parse_args(["verify", "x", "--attention-backend", "nope"])
    with pytest.raises(options.UsageError) as e:
        options.check_engine_args(args)
    assert e.value.message == f"--attention-backend nope: accepted: {', '.join(backend_names())}"


@pytest.mark.parametrize("words, message", [
    (["--block-size", "0"], "--block-size 0: accepted: an int >= 1"),
    (["--max-graph-batch", "0"], "--max-graph-batch 0: accepted: an int >= 1"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5: accepted: None or a float in (0, 1]"),
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size 0: accepted: an int >= 1"),
])
def test_engine_config_rules_name_the_flag_before_the_model_loads(words, message):
    args = build_parser().parse_args(["generate", "x", *words])
    with pytest.raises(options.UsageError) as e:
        options.check_engine_args(args)
    assert e.value.message.startswith(message), e.value.message


def test_serve_with_tensor_parallel_size_2_runs_two_ranks(qwen2_dir, monkeypatch):
    """`prmkern serve --tensor-parallel-size 2` once started no ranks; its engine now has two, and a greedy
    completion through the HTTP app is the single-process engine's."""
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi.testclient import TestClient

    seen = {}

    def serve_once(app, **kw):
        engine = app.state.prmkern.loop.engine
        seen["ranks"] = len(engine.executor.pids)
        try:
            with TestClient(app) as client:
                r = client.post("/v1/completions", json={"prompt": [5, 9, 13], "max_tokens": 6, "temperature": 0})
            seen["tokens"] = r.json()["choices"][0]
        finally:
            engine.close()

    monkeypatch.setattr(uvicorn, "run", serve_once)
    code = main(["serve", qwen2_dir, "--device", "cpu", "--tensor-parallel-size", "2", "--threads", "1",
                 "--block-size", "8", "--port", "0", "--log-level", "warning"])
    assert code == 0 and seen["ranks"] == 2
    with LLM(qwen2_dir, device="cpu", block_size=8) as one:
        want = one.generate([[5, 9, 13]], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    assert seen["tokens"]["text"] == want.text
