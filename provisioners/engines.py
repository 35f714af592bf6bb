"""The engine provisioner: what inference engine this node has, and whether it can use a GPU.

``check_engine()`` imports llama-cpp-python in a child process (a process that imports the
engine must import it before numpy, and a CUDA build initialises the GPUs on import, neither of
which the caller should inherit) and reports its version, the backend it was built for, the
backend libraries beside it, llama.cpp's build information, and whether it can offload layers to
a GPU here. ``llorch engines check`` records that in the catalog.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from catalog.store import EngineRecord

ENGINE_NAME = "llama-cpp-python"

# The GPU backends in the order a node's backend is named after them.
_GPU_BACKENDS = ("cuda", "rocm", "metal", "vulkan", "sycl", "opencl")
_LIB_BACKEND = {"hip": "rocm"}  # llama.cpp's library name → our backend name

_PROBE = r"""
import json, os, re
import llama_cpp
home = os.path.dirname(llama_cpp.__file__)
libs = set()
for directory in (os.path.join(home, "lib"), home):
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            m = re.match(r"(?:lib)?ggml-([a-z]+)\.(?:so|dylib|dll)", name)
            if m and m[1] != "base":
                libs.add(m[1])
print(json.dumps({
    "version": llama_cpp.__version__,
    "info": llama_cpp.llama_print_system_info().decode("utf-8", "replace"),
    "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    "path": home,
    "libs": sorted(libs),
}))
"""


def cuda_build_hint(version: str) -> str:
    """How to rebuild this engine with CUDA (as docs/operators.md gives it)."""
    return (
        "a GPU pool needs llama-cpp-python built with CUDA: "
        'CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF" .venv/bin/pip install --no-cache-dir '
        f"--force-reinstall --no-deps llama-cpp-python=={version} (docs/operators.md, "
        "'Building the engine with CUDA')"
    )


class EngineCheckError(Exception):
    """The engine could not be imported or did not answer."""


@dataclass(frozen=True)
class EngineFacts:
    """What the check found."""

    version: str
    backend: str
    build_info: str
    path: str
    gpu_offload: bool
    backend_libraries: tuple[str, ...]

    def record(self, node_id: str) -> EngineRecord:
        """The catalog record of this engine on ``node_id``."""
        return EngineRecord(
            node_id=node_id,
            name=ENGINE_NAME,
            version=self.version,
            backend=self.backend,
            build_info=self.build_info,
            path=self.path,
            gpu_offload=self.gpu_offload,
            backend_libraries=self.backend_libraries,
        )

    def problem(self) -> str:
        """Why a GPU pool could not run on this engine here; empty when it could."""
        if self.backend == "cpu":
            return f"this engine was built for the CPU only; {cuda_build_hint(self.version)}"
        if not self.gpu_offload:
            return (
                f"this engine was built for {self.backend}, but it sees no GPU "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
            )
        return ""


def backend_of(libraries: list[str], build_info: str) -> str:
    """The backend a build targets, from its backend libraries or its build information."""
    names = {_LIB_BACKEND.get(lib, lib) for lib in libraries}
    info = build_info.upper()
    for backend in _GPU_BACKENDS:
        if backend in names or f"{backend.upper()} :" in info:
            return backend
    return "cpu"


def check_engine(env: Mapping[str, str] | None = None, timeout_s: float = 120.0) -> EngineFacts:
    """Imports the engine in a child process and reports what it is.

    Raises:
        EngineCheckError: the engine is missing, broken, or took too long.
    """
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=dict(os.environ if env is None else env),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise EngineCheckError(f"the engine did not load within {timeout_s:g}s") from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise EngineCheckError(
            f"cannot load {ENGINE_NAME} (exit code {out.returncode}): " + " | ".join(tail)
        )
    facts = json.loads(lines[-1])
    libraries = [str(x) for x in facts["libs"]]
    info = str(facts["info"]).strip()
    return EngineFacts(
        version=str(facts["version"]),
        backend=backend_of(libraries, info),
        build_info=info,
        path=str(facts["path"]),
        gpu_offload=bool(facts["gpu_offload"]),
        backend_libraries=tuple(sorted({_LIB_BACKEND.get(lib, lib) for lib in libraries})),
    )
