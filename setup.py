"""Build of shortcut_kernels._C (torch cpp_extension).

Environment switches (as in flash-attention's setup.py):
  SHORTCUT_KERNELS_SKIP_CUDA_BUILD=1  build the CPU kernels only
  TORCH_CUDA_ARCH_LIST="8.0;9.0"      GPU architectures (default when no GPU is visible)
  MAX_JOBS=N                          parallel compile jobs (ninja)
  CUDA_HOME=/path                     CUDA toolkit; found from `nvcc` otherwise, even when
                                      `nvcc` is a wrapper script outside the toolkit
  SHORTCUT_KERNELS_DEBUG=1            -O0 -g builds
  SHORTCUT_KERNELS_NO_EXT_BUILD=1     build no extension: `make install` registers the checkout
                                      (editable) and keeps the `build_ext --inplace` result
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def toolkit_root_from_nvcc(nvcc):
    """The CUDA toolkit that `nvcc` really runs, also when `nvcc` is a wrapper script."""
    real = os.path.realpath(nvcc)
    candidate = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(candidate, "include", "cuda_runtime.h")):
        return candidate
    # A wrapper (e.g. /usr/local/bin/nvcc -> exec /opt/cuda-X/bin/nvcc): ask nvcc itself.
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
        if match:
            return os.path.normpath(match.group(1).strip('"'))
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            root = toolkit_root_from_nvcc(os.path.join(path, "bin", "nvcc"))
            return root or path
    nvcc = shutil.which("nvcc")
    if nvcc:
        return toolkit_root_from_nvcc(nvcc)
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def pip_cuda_include_dirs():
    """CUDA headers shipped by pip wheels (nvidia/cu13/include, nvidia/*/include)."""
    site = sysconfig.get_paths()["purelib"]
    dirs = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def want_cuda(torch, cuda_home):
    if env_flag("SHORTCUT_KERNELS_SKIP_CUDA_BUILD"):
        print("shortcut_kernels: SHORTCUT_KERNELS_SKIP_CUDA_BUILD=1, building CPU kernels only")
        return False
    if torch.version.cuda is None:
        print("shortcut_kernels: torch is a CPU build, building CPU kernels only")
        return False
    if cuda_home is None:
        print("shortcut_kernels: no nvcc/CUDA_HOME found, building CPU kernels only")
        return False
    return True


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda(torch, cuda_home)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    opt = ["-O0", "-g"] if env_flag("SHORTCUT_KERNELS_DEBUG") else ["-O3"]
    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is an inline `#pragma omp parallel`: without -fopenmp the CPU kernels
    # would silently run on one thread. torch ships libgomp, so the runtime is shared.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    extra = {"cxx": opt + ["-fvisibility=hidden"] + openmp}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + ["-lineinfo",
                               "--expt-relaxed-constexpr"]
        include_dirs += pip_cuda_include_dirs()
        ext_class = cpp_extension.CUDAExtension
        print(f"shortcut_kernels: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    else:
        ext_class = cpp_extension.CppExtension
    ext = ext_class("shortcut_kernels._C", sources, include_dirs=include_dirs,
                    extra_compile_args=extra, extra_link_args=openmp, py_limited_api=False)
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


if env_flag("SHORTCUT_KERNELS_NO_EXT_BUILD"):
    ext_modules, cmdclass = [], {}
else:
    ext_modules, build_ext = extensions()
    cmdclass = {"build_ext": build_ext}

setup(
    packages=find_packages(include=["shortcut_kernels", "shortcut_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
