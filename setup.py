"""Build steps that pyproject.toml cannot declare: the C++ CPU kernels and the files placed into the package.

- The Triton kernels live in the checkout's top-level `kernels/` (no `__init__.py`, so that the checkout never
  shadows the PyPI package `kernels`); a wheel gets them copied into `prmkern/kernels/` beside its `__init__.py`.
- The C++ sources of `csrc/` are copied into `prmkern/_csrc/`, so that an install whose build could not compile
  them (no torch in an isolated build environment) builds them on first use (prmkern/ops/extension.py).
- When torch is importable at build time (`--no-build-isolation`, as scripts/setup_env.sh installs: an isolated
  build environment would download another torch), `csrc/` is built here as the extension `prmkern._C` (OpenMP, no
  -march=native: the kernels pick their instruction set at run time, so one build serves AVX2 and AVX-512). A
  failed build is reported and skipped. PRMKERN_NO_CSRC=1 skips it.
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC_PATTERNS = ("*.cpp", "*.h", "*.inc")


class BuildPyWithKernels(build_py):
    """The regular build, plus kernels/*.py -> prmkern/kernels/ and csrc/ -> prmkern/_csrc/ in the build tree."""

    def run(self):
        super().run()
        for pattern, dest in [("kernels/*.py", "prmkern/kernels")] + [(f"csrc/{p}", "prmkern/_csrc")
                                                                         for p in CSRC_PATTERNS]:
            target = os.path.join(self.build_lib, dest)
            os.makedirs(target, exist_ok=True)
            for src in sorted(glob.glob(os.path.join(HERE, pattern))):
                shutil.copy2(src, os.path.join(target, os.path.basename(src)))


def _csrc_extension() -> dict:
    if os.environ.get("PRMKERN_NO_CSRC") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("prmkern: torch is not importable at build time (an isolated build environment); the C++ CPU kernels "
              "will be built on first use instead (or install with --no-build-isolation)")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Builds prmkern._C, or reports why not and carries on (the torch path needs no extension)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # a missing compiler, an unsupported platform: the package still installs
                print(f"prmkern: the C++ CPU kernels (csrc/) failed to build ({e}); the torch path will be used")
                # an editable install keeps the last build's prmkern/_C*.so: remove it, or it would run kernels
                # that no longer match csrc/
                for stale in glob.glob(os.path.join(HERE, "prmkern", "_C*.so")):
                    os.remove(stale)

        def copy_extensions_to_source(self):  # editable installs: skip an extension that did not build
            try:
                super().copy_extensions_to_source()
            except Exception as e:
                print(f"prmkern: C++ CPU kernels not installed ({e})")

    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    ext = CppExtension("prmkern._C", sources, extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


_ext = _csrc_extension()
setup(cmdclass={"build_py": BuildPyWithKernels, **_ext.pop("cmdclass", {})}, **_ext)
