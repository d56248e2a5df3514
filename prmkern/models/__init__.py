"""Model architectures (one decoder with per-family switches) and the checkpoint loader."""
from prmkern.models.decoder import DecoderForCausalLM, DecoderSpec, ForwardContext
from prmkern.models.loader import ARCHITECTURES, UnsupportedArchitectureError, load_model, read_config

__all__ = ["ARCHITECTURES", "DecoderForCausalLM", "DecoderSpec", "ForwardContext", "UnsupportedArchitectureError",
           "load_model", "read_config"]
