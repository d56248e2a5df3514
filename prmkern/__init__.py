"""prmkern: an inference engine with Triton kernels for generative process reward models.

`LLM` and `SamplingParams` follow vLLM's names; see llm.py. Everything else is reachable from the submodules.
"""
from prmkern.llm import LLM
from prmkern.outputs import CompletionOutput, RequestOutput
from prmkern.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
