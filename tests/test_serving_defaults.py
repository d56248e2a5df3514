"""One set of serving defaults (issue 26): `prmkern serve DIR` and `prmkern serve --model DIR` build the same verifier
config, and a /v1/verify request naming a format gets that format's published defaults (formats._DEFAULTS restated
here from the papers' settings), with the operator's explicit flags and then the request's own fields on top."""
from __future__ import annotations

import os

import pytest

from prmkern.cli.entry import build_parser
from prmkern.cli.options import shipped_verifier_dir
from prmkern.cli.verify import build_config, default_format, given_options
from prmkern.verify.protocols import VerifyConfig

pytest.importorskip("fastapi")
from prmkern.serve.protocol import BadRequest, VerifyRequest  # noqa: E402
from prmkern.serve.verify_api import verify_config  # noqa: E402


def _serve_args(argv):
    args = build_parser().parse_args(["serve", *argv])
    args.model = args.model_dir or args.model  # what run_serve does before anything else
    return args


@pytest.mark.parametrize("model", ["shipped", "other"])
def test_positional_and_flag_model_give_the_same_verifier(model, qwen2_dir):
    path = shipped_verifier_dir() if model == "shipped" else qwen2_dir
    if path is None:
        pytest.skip("no shipped verifier")
    a, b = build_config(_serve_args([path])), build_config(_serve_args(["--model", path]))
    assert a == b
    # the shipped verifier was trained on the prmkern format; any other checkpoint gets ThinkPRM's published settings
    if model == "shipped":
        assert (a.format.name, a.num_chains, a.method, a.max_tokens) == ("prmkern", 8, "min", 1024)
    else:
        assert (a.format.name, a.num_chains, a.method, a.temperature) == ("thinkprm", 1, "final", 0.0)


def test_no_model_means_the_shipped_verifier_format():
    assert default_format(_serve_args([])) == "prmkern"
    assert default_format(_serve_args(["--format", "genprm", "x"])) == "genprm"


def _req(**kw):
    return VerifyRequest(problem="p", steps=["a"], **kw)


def test_request_format_brings_its_defaults():
    server = VerifyConfig(format="prmkern")  # K=8, min, T=0.6, 1024 tokens
    got = verify_config(server, _req(format="thinkprm"), max_n=64, max_tokens=10_000)
    assert (got.format.name, got.num_chains, got.method, got.temperature, got.top_p, got.max_tokens) == \
        ("thinkprm", 1, "final", 0.0, 1.0, 8192 - 20)
    got = verify_config(server, _req(format="genprm"), max_n=64, max_tokens=10_000)
    assert (got.num_chains, got.method, got.temperature, got.top_k, got.max_code_rounds) == (1, "min", 0.6, 20, 3)
    # request fields override the format's defaults
    got = verify_config(server, _req(format="thinkprm", num_chains=4, temperature=0.4, method="mean"), 64, 10_000)
    assert (got.num_chains, got.temperature, got.method, got.top_p) == (4, 0.4, "mean", 1.0)
    # the server's own format keeps the server's config, overridden field by field
    got = verify_config(server, _req(num_chains=2), 64, 10_000)
    assert (got.format.name, got.num_chains, got.method, got.max_tokens) == ("prmkern", 2, "min", 1024)


def test_operator_flags_survive_a_format_change():
    args = _serve_args(["--chains", "3", "--threshold", "0.7"])
    server = build_config(args)
    got = verify_config(server, _req(format="thinkprm"), 64, 10_000, given_options(args))
    assert (got.num_chains, got.threshold, got.method, got.temperature) == (3, 0.7, "final", 0.0)
    assert verify_config(server, _req(format="thinkprm", num_chains=5), 64, 10_000,
                         given_options(args)).num_chains == 5


def test_unknown_request_format_is_a_400():
    with pytest.raises(BadRequest, match="unknown verifier format 'nope'"):
        verify_config(VerifyConfig(format="prmkern"), _req(format="nope"), 64, 10_000)
