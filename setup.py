"""One distribution, `prmkern`: the engine in prmkern/ and the Triton kernels in kernels/ (as prmkern.kernels)."""
from setuptools import setup

setup(
    name="prmkern",
    version="0.1.0",
    description="Inference engine with Triton kernels for generative process reward models",
    python_requires=">=3.10",
    packages=[
        "prmkern",
        "prmkern.attention",
        "prmkern.models",
        "prmkern.sandbox",
        "prmkern.verify",
        "prmkern.serve",
        "prmkern.distributed",
        "prmkern.kernels",
    ],
    package_dir={"prmkern.kernels": "kernels"},
    package_data={"prmkern": ["data/*.jsonl", "data/*.md", "data/verifier/*.json", "data/verifier/*.jsonl",
                               "data/verifier/*.safetensors", "data/verifier/*.jinja"]},
    include_package_data=True,
    # Ranges satisfied by torch 2.13.0 (CPU machines) and torch 2.11 / triton 3.6 / transformers 5.17 (GPU image).
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy>=1.24",
        "sympy>=1.12",
        "tqdm>=4.60",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-benchmark>=4", "httpx>=0.27", "openai>=1.0",
                            "fastapi>=0.110", "uvicorn>=0.29"],  # the server tests run in CI
                    "serve": ["fastapi>=0.110", "uvicorn>=0.29"]},
    entry_points={"console_scripts": ["prmkern=prmkern.cli:main"]},
)
