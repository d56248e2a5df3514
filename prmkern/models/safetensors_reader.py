"""Reading a safetensors file's tensors straight into the tensors that will hold them.

`safe_open(...).get_tensor` returns a new tensor backed by the whole file's memory map, and the loader then copied
it into the model: while loading, the process held the model, the mapped file pages it had touched and the copies
(~2x the weights, more with an fp32 staging model). Here the header is parsed (8-byte little-endian length, then
JSON: name -> dtype, shape, [begin, end) byte offsets after the header) and each tensor's bytes are read with
`readinto` directly into its destination when that is a contiguous CPU tensor of the checkpoint's dtype (the
common case: a bf16 checkpoint loaded in bf16); otherwise into one temporary tensor of the checkpoint's dtype that
is then copied (a dtype conversion, another device). File reads go through the page cache, which does not count
in the process's resident memory: the peak is the model plus at most the largest tensor.

Does not: interpret names (prmkern/models/loader.py maps them), or read other formats.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a safetensors file, not read yet."""
    path: str
    name: str
    dtype: torch.dtype
    shape: torch.Size
    offset: int  # absolute byte offset of its data in the file
    nbytes: int

    def read(self) -> torch.Tensor:
        """A new CPU tensor holding it."""
        out = torch.empty(self.shape, dtype=self.dtype)
        self._read_into(out)
        return out

    def copy_into(self, dest: torch.Tensor) -> None:
        """dest[...] = this tensor (same shape; dtype converted, any device), reading the file once."""
        if tuple(dest.shape) != tuple(self.shape):
            raise ValueError(f"{self.name}: shape {tuple(self.shape)} in {self.path}, destination {tuple(dest.shape)}")
        if dest.device.type == "cpu" and dest.dtype == self.dtype and dest.is_contiguous():
            self._read_into(dest)
        else:
            dest.copy_(self.read())

    def _read_into(self, dest: torch.Tensor) -> None:
        view = memoryview(dest.view(-1).view(torch.uint8).numpy()) if self.nbytes else memoryview(b"")
        assert len(view) == self.nbytes, (self.name, len(view), self.nbytes)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < self.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path}: file ends inside tensor {self.name!r} "
                                     f"(read {done} of {self.nbytes} bytes)")
                done += n


def tensor_refs(path: str) -> list[TensorRef]:
    """The tensors of safetensors file `path`, in file order, checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file: header of {n} bytes in a {size}-byte file")
        header = json.loads(f.read(n))
    refs = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {meta.get('dtype')!r}; readable: {sorted(DTYPES)}")
        dtype, shape = DTYPES[meta["dtype"]], torch.Size(meta["shape"])
        begin, end = meta["data_offsets"]
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name!r} {meta} does not fit its shape or the file ({size} bytes)")
        refs.append(TensorRef(path, name, dtype, shape, 8 + n + begin, nbytes))
    return sorted(refs, key=lambda r: r.offset)
