"""The HTTP request bodies, in OpenAI's field names, and their translation into the engine's SamplingParams.

Unknown fields are rejected (HTTP 400 listing the accepted ones) rather than silently ignored: a client that asks
for a feature this server lacks learns it at once. OpenAI fields the engine cannot honour (`logit_bias`, `suffix`,
tools) are accepted only at their no-op value. Extensions (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `prompt_logprobs`, `return_token_ids`, ...) follow vLLM's server names; prmkern's
own is `logprob_token_ids`. Values are validated by SamplingParams itself, whose messages say what is accepted.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from prmkern.sampling_params import SamplingParams
from prmkern.textcheck import find_lone_surrogate

Number = StrictFloat  # JSON ints are accepted as floats; booleans and strings are not


class ApiError(Exception):
    """Answered as OpenAI's error object {"error": {message, type, param, code}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class BadRequest(ApiError):
    """A request this server cannot run as given; answered 400 with this message (param: the offending field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, param)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit null stands for "not given" (clients send `"n": null`, `"stream": null`)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


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
    user: StrictStr | None = None  # accepted and ignored (OpenAI's end-user tag)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None  # OpenAI: how many top alternatives per position (0: the sampled token only)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


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
    parallel_tool_calls: StrictBool | None = None


class VerifyRequest(_Request):
    """prmkern's /v1/verify: one solution (a problem and its steps) scored step by step by the verifier. Every other
    field overrides the server's verification config (the `prmkern serve` flags) for this request only."""

    problem: StrictStr
    steps: list[StrictStr] = Field(min_length=1)
    id: StrictStr | StrictInt | None = None
    model: StrictStr | None = None
    format: StrictStr | None = None
    num_chains: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    max_tokens: StrictInt | None = None
    budget_tokens: StrictInt | None = None
    method: Literal["min", "last", "mean", "product", "final", "vote"] | None = None  # scoring.METHODS
    threshold: Number | None = None
    seed: StrictInt | None = None
    scoring: Literal["released", "exact"] | None = None  # None: the server's (--scoring, else the format's default)
    stop_at_first_error: StrictBool | None = None  # stop judging once the earliest error is decided
    include_chains: StrictBool = True


def accepted_fields(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def sampling_params(req: _SamplingFields, *, max_tokens: int, logprobs: int | None, max_n: int) -> SamplingParams:
    """The engine's SamplingParams for a validated body. Raises BadRequest naming the field and what is accepted."""
    if not 1 <= req.n <= max_n:
        raise BadRequest(f"n={req.n} is invalid; accepted: an int in [1, {max_n}] (--max-n)", "n")
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported by this server; accepted: null or {}", "logit_bias")
    penalties = {name: getattr(req, name) for name in ("presence_penalty", "frequency_penalty",
                                                      "repetition_penalty", "min_p") if getattr(req, name) is not None}
    stop = req.stop
    if isinstance(stop, list) and len(stop) > 16:
        raise BadRequest(f"stop has {len(stop)} strings; accepted: at most 16", "stop")
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=-1 if req.top_k is None else req.top_k,
            min_tokens=req.min_tokens, max_tokens=max_tokens, ignore_eos=req.ignore_eos, stop=stop,
            stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
            seed=req.seed, logprobs=logprobs, prompt_logprobs=req.prompt_logprobs,
            logprob_token_ids=req.logprob_token_ids, skip_special_tokens=req.skip_special_tokens, **penalties)
    except (TypeError, ValueError) as e:
        named = re.match(r"SamplingParams\.(\w+)=", str(e))
        raise BadRequest(str(e), named.group(1) if named else None) from e
