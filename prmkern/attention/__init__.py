"""Attention backends behind one seam (see backend.py) and the per-step metadata they read (metadata.py)."""
from prmkern.attention.backend import (BACKENDS, AttentionBackend, backend_class, backend_names, default_backend,
                                       get_backend, register_backend)
from prmkern.attention.metadata import AttentionMetadata, DecodeMetadata, PrefillMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "DecodeMetadata", "default_backend", "PrefillMetadata",
           "get_backend", "register_backend", "backend_class", "backend_names"]
