"""The engine provisioner on this machine's real llama-cpp-python (a CPU build), and how a
build's backend is named."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest

from provisioners.engines import EngineCheckError, backend_of, check_engine


def test_this_machines_engine_is_a_cpu_build_that_cannot_offload() -> None:
    facts = check_engine()
    assert facts.version == metadata.version("llama-cpp-python")
    assert facts.backend == "cpu" and not facts.gpu_offload
    assert "cpu" in facts.backend_libraries
    assert facts.build_info.startswith("CPU :")
    assert Path(facts.path, "__init__.py").is_file()
    problem = facts.problem()
    assert "built for the CPU only" in problem
    assert f"llama-cpp-python=={facts.version}" in problem and "-DGGML_CUDA=on" in problem
    record = facts.record("node-a")
    assert (record.node_id, record.name, record.backend) == ("node-a", "llama-cpp-python", "cpu")


@pytest.mark.parametrize(
    ("libraries", "info", "backend"),
    [
        (["cpu"], "CPU : AVX2 = 1 |", "cpu"),
        (["cpu", "cuda"], "CPU : AVX2 = 1 |", "cuda"),
        (["cpu"], "CUDA : ARCHS = 900 | CPU : AVX2 = 1 |", "cuda"),  # statically linked
        (["cpu", "hip"], "", "rocm"),
        (["metal"], "", "metal"),
        (["cpu", "vulkan"], "", "vulkan"),
        ([], "", "cpu"),
    ],
)
def test_the_backend_is_named_after_the_gpu_library(
    libraries: list[str], info: str, backend: str
) -> None:
    assert backend_of(libraries, info) == backend


def test_a_broken_engine_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "llama_cpp"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libllama.so: cannot open shared object')")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with pytest.raises(EngineCheckError) as broken:
        check_engine(env)
    assert "cannot load llama-cpp-python" in str(broken.value)
    assert "libllama.so: cannot open shared object" in str(broken.value)
