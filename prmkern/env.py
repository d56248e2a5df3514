"""Every environment variable prmkern reads, with what it does: the one list docs/reference.md is generated from.
tests/test_reference_doc.py checks that each name the code reads (os.environ / os.getenv) is listed here."""
from __future__ import annotations

ENV_VARS: dict[str, str] = {
    "PRMKERN_CACHE": "Folder for prmkern's caches: the random-weight default model (prmkern/tiny.py) and the C++ "
                     "kernels built on first use with their build.log (default: ~/.cache/prmkern).",
    "PRMKERN_API_KEY": "Default of `prmkern serve --api-key`: when set, /v1/* needs 'Authorization: Bearer KEY'.",
    "PRMKERN_BUILD_CPP": "0: never build the C++ kernels on first use (the torch paths run instead).",
    "PRMKERN_DISABLE_CPP": "1: do not load the C++ kernels even when built (the torch paths run instead).",
    "PRMKERN_CPU_MALLOC": "default: leave glibc's malloc as it is; otherwise a CPU engine keeps freed memory in the "
                          "process (no page faults on a prefill's temporaries: prmkern/engine/cpu_malloc.py).",
    "PRMKERN_DP_TIMEOUT_S": "Data-parallel jobs: seconds the ranks wait for each other at the end (default 7 days).",
    "PRMKERN_DP_FAULT": "Tests only: 'RANK:CHUNKS[:raise]' makes rank RANK fail after CHUNKS chunks.",
    "RANK": "Set by torchrun: this process's rank; with WORLD_SIZE, MASTER_ADDR and MASTER_PORT it makes a "
            "command data-parallel (docs/distributed.md).",
    "WORLD_SIZE": "Set by torchrun: the number of ranks.",
    "MASTER_ADDR": "Set by torchrun: the rendezvous address.",
    "MASTER_PORT": "Set by torchrun: the rendezvous port.",
    "LOCAL_RANK": "Set by torchrun: the rank within this machine (picks cuda:LOCAL_RANK).",
    "PATH": "Searched for the Python that runs graders' checks (prmkern/verify/grading.py).",
    "OMP_NUM_THREADS": "Tensor-parallel CPU workers set it (if unset) to their share of the cores.",
    "TRITON_INTERPRET": "1 (set before importing prmkern): Triton kernels run on the CPU through numpy.",
}
