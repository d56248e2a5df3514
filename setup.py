"""One distribution, `prmkern`: the engine in prmkern/ and the Triton kernels in kernels/ (as prmkern.kernels).

When torch is importable at build time (install with `--no-build-isolation`, as scripts/setup_env.sh does: an
isolated build environment would download another torch), the C++ CPU kernels of csrc/ are built as the optional
extension `prmkern._C` (OpenMP, no -march=native: the kernels pick their instruction set at run time). A failed
build is reported and skipped; prmkern then runs its torch path. PRMKERN_NO_CSRC=1 skips the build.
"""
import glob
import os

from setuptools import setup


def _csrc_extension() -> dict:
    if os.environ.get("PRMKERN_NO_CSRC") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("prmkern: torch is not importable at build time; the C++ CPU kernels (csrc/) are not built")
        return {}

    here = os.path.dirname(os.path.abspath(__file__))

    class OptionalBuildExtension(BuildExtension):
        """Builds prmkern._C, or reports why not and carries on (the torch path needs no extension)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # a missing compiler, an unsupported platform: the package still installs
                print(f"prmkern: the C++ CPU kernels (csrc/) failed to build ({e}); the torch path will be used")
                # an editable install keeps the last build's prmkern/_C*.so: remove it, or it would run kernels
                # that no longer match csrc/
                for stale in glob.glob(os.path.join(here, "prmkern", "_C*.so")):
                    os.remove(stale)

        def copy_extensions_to_source(self):  # editable installs: skip an extension that did not build
            try:
                super().copy_extensions_to_source()
            except Exception as e:
                print(f"prmkern: C++ CPU kernels not installed ({e})")

    sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    ext = CppExtension("prmkern._C", sources, extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}

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
    **_csrc_extension(),
)
