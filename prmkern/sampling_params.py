"""SamplingParams: how a request's chains are sampled and when they stop, in vLLM's names and meanings, validated on
creation; and vLLM's BeamSearchParams for LLM.beam_search (prmkern/beam_search.py) (a bad value raises ValueError naming what is accepted; bool is never taken for an int, NaN and inf never
for a float)."""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any


def _is_int(x: object) -> bool:
    """An int (numpy ints too), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    """A finite real number (numpy floats too), not a bool, not NaN or inf."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

INT_FIELDS = ("n", "top_k", "min_tokens")
REAL_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


SEED_BITS = 62


def derive_seed(seed: int, *parts: int) -> int:
    """The seed of one part of a seeded whole (a chain of a request, a batch of a job, a record's round, a beam):
    a function of the whole's seed and the part's integer position only, so a part draws the same tokens whatever
    else runs beside it, in this process or another (ints and tuples of ints hash the same in every process)."""
    return hash((seed, *parts)) & ((1 << SEED_BITS) - 1)


@dataclass
class SamplingParams:
    """n: chains sampled per prompt (they share the prompt's KV blocks). temperature 0 is greedy.
    top_k <= 0 and top_p = 1 disable those filters; min_p (vLLM's): drop tokens whose probability (after temperature)
    is below min_p times the most likely token's. min_tokens suppresses EOS/stop tokens until reached.
    Penalties (vLLM's definitions, applied before temperature, also to greedy requests): repetition_penalty divides
    the positive logits and multiplies the negative ones of every token seen in the prompt or the output;
    frequency_penalty subtracts penalty * count of each token in the output, presence_penalty subtracts penalty once
    for every token present in the output.
    stop: strings that end a chain (the text is cut before the stop string unless include_stop_str_in_output).
    seed: reproduces this request's chains whatever else is batched with it.
    logprobs=k (vLLM's): at each generated position a dict {token_id: Logprob} of the k most likely tokens plus the
    sampled one; 0: the sampled token's only; None: none. True is taken as 0 and False as None (prmkern's earlier
    bool flag). prompt_logprobs=k: the same for every prompt position (the first is None).
    prompt_logprobs_start (prmkern's): the first prompt position that gets prompt logprobs (default 1, every one);
    blocks of the prefix cache before it are reused instead of recomputed, which is how a chain is scored after a
    cached problem prefix.
    prompt_logprob_token_ids / prompt_logprob_start (vLLM 0.32's): per causal prompt row from prompt_logprob_start
    (default 0) on, the log-probabilities of that row's ids as predictions of the next prompt token (row i: prompt
    token prompt_logprob_start + i + 1), -1 padding a row; one row per scored position (prompt_len - 1 - start);
    RequestOutput.prompt_token_id_logprobs holds them as a float32 numpy array [rows, ids], -inf where padded.
    prompt_logprob_start + 1 is prompt_logprobs_start's position, and like it skips the cached blocks before it.
    logprob_token_ids (prmkern's): at every generated position, the log-probabilities of these ids (how verdict
    probabilities such as P(Yes) vs P(No) are read exactly). All log-probabilities are of the model's raw
    distribution (vLLM's default logprobs_mode "raw_logprobs": before penalties, temperature and filters).
    first_chain (prmkern's): with a seed, chain i of this request samples as chain first_chain + i of the seeded
    whole, so chains can be drawn in waves (n=5, then n=3 with first_chain=5) and equal one n=8 request's."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    max_tokens: int | None = 16  # None: until the model's context (max_model_len) is full
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 1
    prompt_logprob_token_ids: list[list[int]] | None = None  # vLLM's (also a numpy int array [rows, ids])
    prompt_logprob_start: int | None = None  # vLLM's: the first causal prompt row scored by the ids above
    logprob_token_ids: list[int] | None = None
    first_chain: int = 0
    skip_special_tokens: bool = True
    # vLLM's: allowed_token_ids restricts sampling to these ids; logit_bias {id: bias} is added to the logits (both
    # before penalties, as in vLLM); detokenize=False leaves CompletionOutput.text empty; best_of must be None or n
    # (vLLM V1 dropped it too); spaces_between_special_tokens is accepted (fast tokenizers ignore it).
    allowed_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    best_of: int | None = None
    spaces_between_special_tokens: bool = True
    # vLLM's: words whose last token may not complete them (each word with and without a leading space); the engine
    # tokenizes them at admission (LLMEngine.add_request).
    bad_words: list[str] | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)
    # vLLM's: the stop ids the engine adds at admission (update_from_generation_config: the model's EOS ids);
    # all_stop_token_ids is stop_token_ids plus these.
    _eos_stop_ids: set[int] = field(default_factory=set, init=False, repr=False, compare=False)
    _eos_token_id: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid; accepted: {accepted}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an int >= 1 (not a bool)")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a float >= 0 (0 = greedy), finite: not NaN or inf")
        if not _is_int(self.top_k):
            raise bad("top_k", "an int; <= 0 disables")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a float in (0, 1]")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a float in [0, 1] (0 disables)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_real(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "a float in [-2, 2] (0 disables)")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a finite float > 0 (1 disables)")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an int >= 1, or None (up to the model's context)")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise bad("min_tokens", f"an int in [0, max_tokens={self.max_tokens}]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an int or None")
        if isinstance(self.logprobs, bool):  # prmkern's earlier flag: True = the sampled token's log-probability
            self.logprobs = 0 if self.logprobs else None
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or k < -1):
                raise bad(name, "None, -1 (the whole vocabulary, vLLM's meaning) or an int >= 0 (the number of "
                                "top tokens per position; 0: the chosen token's only)")
        if not _is_int(self.first_chain) or self.first_chain < 0:
            raise bad("first_chain", "an int >= 0 (the seeded whole's index of this request's first chain)")
        if not _is_int(self.prompt_logprobs_start) or self.prompt_logprobs_start < 1:
            raise bad("prompt_logprobs_start", "an int >= 1 (prompt position 0 has no log-probability)")
        self._check_prompt_logprob_token_ids()
        if isinstance(self.stop, str):
            stop = [self.stop]
        elif self.stop is None or isinstance(self.stop, (list, tuple)):
            stop = list(self.stop or [])
        else:
            stop = [None]
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        self.stop_strings = tuple(stop)
        for name in ("stop_token_ids", "logprob_token_ids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, (list, tuple)) or
                                    any(not _is_int(i) or i < 0 for i in ids)):
                raise bad(name, "a list of non-negative token ids (ints)")
        if self.greedy and self.n > 1:  # vLLM's rule and message: greedy chains would all be the same
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.bad_words is not None and (not isinstance(self.bad_words, (list, tuple)) or
                                           any(not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            raise bad("bad_words", "None or a list of non-empty strings")
        if self.best_of is not None and self.best_of != self.n:
            raise bad("best_of", f"None or n={self.n} (best-of-n selection is not supported; sample n chains and rank "
                                 f"them by cumulative_logprob)")
        ids = self.allowed_token_ids
        if ids is not None and (not isinstance(ids, (list, tuple)) or not ids or
                                any(not _is_int(i) or i < 0 for i in ids)):
            raise bad("allowed_token_ids", "None or a non-empty list of non-negative token ids (ints)")
        bias = self.logit_bias
        if bias is not None and (not isinstance(bias, dict) or
                                 any(not (_is_int(k) and k >= 0 or
                                          isinstance(k, str) and k.isascii() and k.isdigit()) or
                                     not _is_real(v) for k, v in bias.items())):
            raise bad("logit_bias", "None or a dict {token_id >= 0: finite float bias}")
        if bias is not None:  # OpenAI-style string keys ("50256") are token ids too
            self.logit_bias = {int(k): float(v) for k, v in bias.items()}
        if ids is not None:
            self.allowed_token_ids = [int(i) for i in ids]
        if not self.detokenize and self.stop_strings:
            raise bad("stop", "no stop strings when detokenize=False (stop strings are matched on the text)")
        self.stop_token_ids = [int(i) for i in self.stop_token_ids or []]
        if self.logprob_token_ids is not None:
            self.logprob_token_ids = [int(i) for i in self.logprob_token_ids]
        # Plain Python numbers from here on (numpy scalars are accepted above).
        for name in INT_FIELDS:
            setattr(self, name, int(getattr(self, name)))
        for name in REAL_FIELDS:
            setattr(self, name, float(getattr(self, name)))
        for name in ("seed", "logprobs", "prompt_logprobs", "max_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        self.prompt_logprobs_start = int(self.prompt_logprobs_start)

    def _check_prompt_logprob_token_ids(self) -> None:
        """vLLM's checks (and messages where it has them); rows are padded with -1 to one width, as nested lists."""
        rows = self.prompt_logprob_token_ids
        if rows is None:
            if self.prompt_logprob_start is not None:
                raise ValueError("prompt_logprob_start requires prompt_logprob_token_ids.")
            return
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
        if (not isinstance(rows, (list, tuple)) or not rows or any(not isinstance(r, (list, tuple)) for r in rows)
                or not max(map(len, rows)) or any(not _is_int(t) or t < -1 for r in rows for t in r)):
            raise ValueError("prompt_logprob_token_ids must be a non-empty integer array of shape [num_rows, num_ids] "
                             "(or nested lists of token ids; -1 pads a row)")
        width = max(map(len, rows))
        self.prompt_logprob_token_ids = [[int(t) for t in r] + [-1] * (width - len(r)) for r in rows]
        start = self.prompt_logprob_start
        if start is not None and (not _is_int(start) or start < 0):
            raise ValueError(f"SamplingParams.prompt_logprob_start={start!r} is invalid; accepted: None or an int "
                             f">= 0 (the first causal prompt row scored)")
        self.prompt_logprob_start = None if start is None else int(start)

    @property
    def all_stop_token_ids(self) -> set[int]:
        """vLLM's: every token id that ends a chain or that min_tokens holds back: stop_token_ids, plus the EOS ids
        the engine added with update_from_generation_config (vLLM adds them whatever ignore_eos says, for
        min_tokens). A new SamplingParams holds stop_token_ids only, as vLLM's does: its engines add EOS to a
        copy at admission. A fresh set each time, so stop_token_ids set after construction is counted."""
        return set(self.stop_token_ids or ()) | self._eos_stop_ids

    @property
    def eos_token_id(self) -> int | None:
        """vLLM's: the model's EOS id as update_from_generation_config set it; None with ignore_eos."""
        return self._eos_token_id

    def update_from_generation_config(self, generation_config: dict[str, Any],
                                      eos_token_id: int | None = None) -> None:
        """vLLM's: the model's EOS ids join the stop ids. `eos_token_id` (the tokenizer's) joins
        all_stop_token_ids and, unless ignore_eos, becomes eos_token_id; generation_config's other "eos_token_id"
        ids (an int or a list) join all_stop_token_ids and, unless ignore_eos, stop_token_ids."""
        if not isinstance(generation_config, dict):
            raise TypeError(f"generation_config must be a dict (generation_config.json's fields), got "
                            f"{type(generation_config).__name__}")
        if eos_token_id is not None and (not _is_int(eos_token_id) or eos_token_id < 0):
            raise ValueError(f"eos_token_id={eos_token_id!r} is invalid; accepted: None or a token id (an int >= 0)")
        if not self.ignore_eos:
            self._eos_token_id = None if eos_token_id is None else int(eos_token_id)
        if eos_token_id is not None:
            self._eos_stop_ids.add(int(eos_token_id))
        ids = generation_config.get("eos_token_id")
        if ids is None:
            return
        ids = [ids] if not isinstance(ids, (list, tuple)) else list(ids)
        if any(not _is_int(i) or i < 0 for i in ids):
            raise ValueError(f"generation_config eos_token_id={generation_config['eos_token_id']!r} is invalid; "
                             f"accepted: a token id or a list of token ids (ints >= 0)")
        extra = {int(i) for i in ids} - {eos_token_id}
        self._eos_stop_ids |= extra
        if extra and not self.ignore_eos:
            self.stop_token_ids = list(dict.fromkeys([*self.stop_token_ids, *sorted(extra)]))

    def clone(self) -> "SamplingParams":
        """vLLM's: a deep copy (lists and dicts included), so editing the copy leaves this one as it is. vLLM copies
        its logits processors shallowly; prmkern has none (vllm_args.py rejects them)."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 (vLLM's threshold too) dividing logits by the temperature overflows float32.
        return self.temperature < 1e-5

    @property
    def has_logit_edits(self) -> bool:
        return self.allowed_token_ids is not None or bool(self.logit_bias)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _bad_beam(name: str, value: object, accepted: str) -> ValueError:
    return ValueError(f"BeamSearchParams.{name}={value!r} is invalid; accepted: {accepted}")


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams (vllm.sampling_params): beam_width beams, max_tokens steps, temperature 0 (vLLM's
    default) ranks the candidates only; above 0 each beam also offers one sampled token. length_penalty is the
    exponent of the length that divides the cumulative log-probability when beams are ranked."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # accepted, as vLLM does (beam search has no stop strings)
    skip_special_tokens: bool = True  # when decoding `text`

    def __post_init__(self) -> None:
        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= 1024:
            raise _bad_beam("beam_width", self.beam_width, "an int in [1, 1024]")
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise _bad_beam("max_tokens", self.max_tokens, "an int >= 0 (steps of one token)")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise _bad_beam("temperature", self.temperature, "a float >= 0 (0: the most likely tokens only)")
        if not _is_real(self.length_penalty):
            raise _bad_beam("length_penalty", self.length_penalty, "a finite float (1.0: divide by the length)")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad_beam(name, getattr(self, name), "a bool")
