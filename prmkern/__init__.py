"""prmkern: an inference engine with Triton kernels for generative process reward models."""
__version__ = "0.1.0"
