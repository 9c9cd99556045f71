"""The one compiled piece: djinnd._rows_attention (djinnd/csrc), built against the installed torch.

Optional: where it cannot be built (no compiler), djinnd decodes batches with one SDPA call a row.
Build with `pip install --no-build-isolation` so it sees that torch (the Makefile does)."""

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch is not installed yet: nothing to build against
    ext_modules, cmdclass = [], {}
else:
    ext_modules = [CppExtension("djinnd._rows_attention", ["djinnd/csrc/rows_attention.cpp"],
                                extra_compile_args=["-O3"], optional=True)]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
