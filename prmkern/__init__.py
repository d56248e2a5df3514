"""prmkern: an inference engine with Triton kernels for generative process reward models.

`LLM`, `SamplingParams` and the output / prompt types follow vLLM's names and meanings; see
docs/api.md. Everything else is reachable from the submodules.
"""
from prmkern.llm import LLM
from prmkern.outputs import CompletionOutput, Logprob, RequestOutput
from prmkern.pooling import PoolingOutput, PoolingParams, PoolingRequestOutput
from prmkern.prompts import TextPrompt, TokensPrompt
from prmkern.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "BeamSearchParams", "CompletionOutput", "Logprob", "PoolingOutput", "PoolingParams",
           "PoolingRequestOutput", "RequestOutput", "SamplingParams", "TextPrompt", "TokensPrompt"]
