"""The HTTP request bodies, in OpenAI's field names, and their translation into the engine's SamplingParams.

Unknown fields of the OpenAI/vLLM routes are ignored with a logged warning that names them (once per field name
per process), as vLLM 0.32 ignores them (it logs them at debug level): a client written for another server keeps
working. prmkern's own /v1/verify stays strict (an unknown field is a 400 listing the accepted ones), since a
misspelt verifier option silently ignored would change the scores. OpenAI fields that change nothing about the answer and that vLLM
also ignores (`metadata`, `store`, `service_tier`, `user`, ... : IGNORED_FIELDS) are accepted and ignored; fields
the engine cannot honour (`suffix`, tools, guided decoding: `response_format` json_object / json_schema, vLLM's
`guided_*` and `structured_outputs`) are accepted only at their no-op value, else a 400 names the feature. Extensions (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `prompt_logprobs`, `return_token_ids`, ...) follow vLLM's server names; prmkern's
own is `logprob_token_ids`. Values are validated by SamplingParams itself, whose messages say what is accepted.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from prmkern.sampling_params import SamplingParams
from prmkern.textcheck import find_lone_surrogate

Number = StrictFloat  # JSON ints are accepted as floats; booleans and strings are not


class ApiError(Exception):
    """Answered as OpenAI's error object {"error": {message, type, param, code}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


RETRY_AFTER_S = 1  # what an overloaded answer tells the client to wait (seconds)


def overloaded(message: str) -> ApiError:
    """503 with Retry-After: the token-bounded admission is full (or the server is stopping)."""
    return ApiError(503, message, None, "overloaded_error", {"Retry-After": str(RETRY_AFTER_S)})


class BadRequest(ApiError):
    """A request this server cannot run as given; answered 400 with this message (param: the offending field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, param)


log = logging.getLogger("prmkern.serve")
_warned_fields: set[str] = set()  # unknown field names already logged (once per name per process)
_warned_lock = threading.Lock()


def warn_ignored_fields(where: str, names: Any) -> None:
    """Logs a warning naming the unknown fields of a request that were ignored, each name once per process (a
    client that sends the same extra field with every request logs it once, not per request)."""
    with _warned_lock:
        new = sorted(n for n in names if n not in _warned_fields)
        _warned_fields.update(new)
    if new:
        log.warning("ignored request fields this server does not know (%s), as vLLM ignores them: %s", where,
                    ", ".join(new))


class _Body(BaseModel):
    """A JSON object of the OpenAI/vLLM surface: unknown fields are ignored with a warning naming them."""
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit null stands for "not given" (clients send `"n": null`, `"stream": null`)."""
        if isinstance(data, dict):
            if cls.model_config.get("extra") == "ignore":
                unknown = [k for k in data if k not in cls.model_fields]
                if unknown:
                    warn_ignored_fields(cls.__name__, [str(k)[:64] for k in unknown])
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class _StrictBody(_Body):
    """A JSON object of prmkern's own routes (/v1/verify): an unknown field is a 400 listing the accepted ones."""
    model_config = ConfigDict(extra="forbid")


class _Request(_Body):
    """A whole request body: its text must be encodable (a lone surrogate such as "\\ud800" is a 400 naming the
    field, not a tokenizer's TypeError and a 500)."""

    @model_validator(mode="before")
    @classmethod
    def _encodable_text(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            raise ValueError(f"{found[0] or 'the body'} holds a lone surrogate {found[1]} (half of a UTF-16 pair); "
                             f"accepted: Unicode text that UTF-8 can encode")
        return data


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: StrictStr | None = None
    n: StrictInt = 1
    temperature: Number | None = None  # None: 1.0, as OpenAI
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprob_token_ids: list[StrictInt] | None = None  # prmkern: per position, the logprobs of these ids
    return_token_ids: StrictBool = False  # vLLM's extension: each choice also carries its generated token ids
    prompt_logprobs: StrictInt | None = None  # vLLM's extension: per prompt position, the top-k + the prompt token
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    min_p: Number | None = None
    logit_bias: dict[str, Number] | None = None
    # Accepted and ignored, as vLLM does (IGNORED_FIELDS): tags and storage options of OpenAI's hosted API.
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    # vLLM's guided decoding: refused with a 400 naming the feature (GUIDED_FIELDS)
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None  # OpenAI: how many top alternatives per position (0: the sampled token only)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    response_format: dict[str, Any] | None = None  # only {"type": "text"}: no guided decoding


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # None: the rest of the model's context
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None  # accepted and ignored (no tools)
    reasoning_effort: StrictStr | None = None  # accepted and ignored, as below (IGNORED_FIELDS)
    modalities: list[StrictStr] | None = None
    prediction: Any = None
    verbosity: StrictStr | None = None


class VerifySolution(_StrictBody):
    """One solution of a batch /v1/verify call."""
    problem: StrictStr
    steps: list[StrictStr] = Field(min_length=1)
    id: StrictStr | StrictInt | None = None


class VerifySettings(_Request, _StrictBody):
    """The verification settings a request may override for itself (the `prmkern serve` flags of the same names):
    /v1/verify's and /v1/sessions' shared fields."""

    model: StrictStr | None = None
    format: StrictStr | None = None
    num_chains: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    max_tokens: StrictInt | None = None
    method: Literal["min", "last", "mean", "product", "final", "vote"] | None = None  # scoring.METHODS
    threshold: Number | None = None
    seed: StrictInt | None = None
    scoring: Literal["released", "exact"] | None = None  # None: the server's (--scoring, else the format's default)


class VerifyRequest(VerifySettings):
    """prmkern's /v1/verify: one solution (`problem` and `steps`) or a batch (`solutions`: a list of them), scored
    step by step by the verifier. Every other field overrides the server's verification config (the `prmkern serve`
    flags) for this request only."""

    problem: StrictStr | None = None
    steps: list[StrictStr] | None = Field(default=None, min_length=1)
    solutions: list[VerifySolution] | None = Field(default=None, min_length=1)
    id: StrictStr | StrictInt | None = None
    budget_tokens: StrictInt | None = None
    stop_at_first_error: StrictBool | None = None  # stop judging once the earliest error is decided
    chains_min: StrictInt | None = None  # adaptive chain count (verify/adaptive.py): the first wave
    chains_max: StrictInt | None = None  # adaptive chain count: at most this many chains (sets num_chains)
    chains_risk: Number | None = None  # adaptive chain count: the stopping rule's risk
    include_chains: StrictBool = True
    stream: StrictBool = False  # server-sent events: step verdicts as they are parsed, then the body

    @model_validator(mode="after")
    def _one_form(self) -> "VerifyRequest":
        single = self.problem is not None or self.steps is not None
        if single == (self.solutions is not None):
            raise ValueError("give either problem and steps (one solution) or solutions (a batch), not both")
        if single and (self.problem is None or self.steps is None):
            raise ValueError("one solution needs both problem and steps")
        return self


IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
                  "parallel_tool_calls", "reasoning_effort", "modalities", "prediction", "verbosity")
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def check_unsupported(req: _SamplingFields) -> None:
    """A 400 naming the feature for guided decoding, which this server does not have."""
    for name in GUIDED_FIELDS:
        if getattr(req, name) is not None:
            raise BadRequest(f"{name}: guided decoding (structured outputs) is not supported by this server; "
                             f"accepted: {name} null", name)
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.get("type") != "text":
        raise BadRequest(f"response_format type {fmt.get('type')!r}: guided decoding (JSON mode, JSON schema) is "
                         f"not supported by this server; accepted: null or {{'type': 'text'}}", "response_format")


def logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    """OpenAI's logit_bias {"token id": bias}: ids checked against the vocabulary, biases clamped to [-100, 100]
    (OpenAI's range; vLLM clamps the same way)."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        # ASCII digits only: str.isdigit() also takes "²" (int() then fails) and "٣" (which int() reads as 3)
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise BadRequest(f"logit_bias has key {key!r}; accepted: token ids (as strings) in [0, {vocab})",
                             "logit_bias")
        out[int(key)] = min(100.0, max(-100.0, float(value)))
    return out


def accepted_fields(model: type[BaseModel]) -> str:
    """The body's field names, the model's own first (problem, steps), then those it inherits (VerifySettings)."""
    own = [name for name in model.__dict__.get("__annotations__", {}) if name in model.model_fields]
    return ", ".join(own + [name for name in model.model_fields if name not in own])


def sampling_params(req: _SamplingFields, *, max_tokens: int, logprobs: int | None, max_n: int, vocab: int,
                    defaults: dict[str, Any] | None = None) -> SamplingParams:
    """The engine's SamplingParams for a validated body. Raises BadRequest naming the field and what is accepted.
    `defaults`: the model's generation_config sampling defaults (vLLM's), used where the request leaves a field
    unset."""
    if not 1 <= req.n <= max_n:
        raise BadRequest(f"n={req.n} is invalid; accepted: an int in [1, {max_n}] (--max-n)", "n")
    check_unsupported(req)
    d = defaults or {}
    penalties = {name: getattr(req, name) if getattr(req, name) is not None else d.get(name)
                 for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")}
    penalties = {k: v for k, v in penalties.items() if v is not None}
    temperature = req.temperature if req.temperature is not None else d.get("temperature", 1.0)
    top_p = req.top_p if req.top_p is not None else d.get("top_p", 1.0)
    top_k = req.top_k if req.top_k is not None else d.get("top_k", -1)
    stop = req.stop
    if isinstance(stop, list) and len(stop) > 16:
        raise BadRequest(f"stop has {len(stop)} strings; accepted: at most 16", "stop")
    try:
        return SamplingParams(
            n=req.n, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
            logit_bias=logit_bias(req.logit_bias, vocab),
            min_tokens=req.min_tokens, max_tokens=max_tokens, ignore_eos=req.ignore_eos, stop=stop,
            stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
            seed=req.seed, logprobs=logprobs, prompt_logprobs=req.prompt_logprobs,
            logprob_token_ids=req.logprob_token_ids, skip_special_tokens=req.skip_special_tokens, **penalties)
    except (TypeError, ValueError) as e:
        named = re.match(r"SamplingParams\.(\w+)=|(\w+) must ", str(e))  # ours, or vLLM's "n must be 1 when ..."
        raise BadRequest(str(e), (named.group(1) or named.group(2)) if named else None) from e
