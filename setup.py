"""Build the Cython kernels in csrc/ into llm_fast._kernels.<name>.

OpenMP is used when the compiler accepts -fopenmp; otherwise the kernels build serially and a
message says so. No -march=native by default: SIMD (AVX2 / AVX-512) is reached through runtime
dispatch in csrc/simd.h. LLM_FAST_NATIVE=1 opts into -march=native for a local build.
LLM_FAST_DEBUG=1 turns Cython bounds checks back on.
"""
import os
import glob
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiler_accepts_openmp():
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as f:
            f.write(src)
        res = subprocess.run([cc, "-fopenmp", path, "-o", os.path.join(tmp, "t")],
                             capture_output=True)
        return res.returncode == 0


if os.environ.get("LLM_FAST_NO_OPENMP") == "1":
    OPENMP = False
else:
    OPENMP = _compiler_accepts_openmp()
if not OPENMP:
    print("llm_fast: the C compiler does not accept -fopenmp (or LLM_FAST_NO_OPENMP=1); "
          "building single-threaded kernels.", file=sys.stderr)

compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c11"]
link_args = []
if OPENMP:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if os.environ.get("LLM_FAST_NATIVE") == "1":
    compile_args.append("-march=native")

debug = os.environ.get("LLM_FAST_DEBUG") == "1"
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}

only = os.environ.get("LLM_FAST_EXTENSIONS")  # dev: "linalg,quant" builds just those
extensions = []
for pyx in sorted(glob.glob(os.path.join("csrc", "*.pyx"))):
    name = os.path.splitext(os.path.basename(pyx))[0]
    if only and name not in only.split(","):
        continue
    extensions.append(Extension(
        f"llm_fast._kernels.{name}", [pyx],
        include_dirs=["csrc", np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args, extra_link_args=link_args,
    ))

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives,
                          compile_time_env={"HAVE_OPENMP": OPENMP}),
)
