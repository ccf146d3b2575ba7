"""setup.py's build rules that a CPU machine can check: no two extension sources compile to one object
(ninja refuses such a build: "multiple rules generate csrc/x.o"), and the CUDA toolkit is found behind an
nvcc wrapper script or named in one line. The build itself is `make cuda-build` (csrc/check/cuda_build.py)."""

import importlib.util
import os
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("pairuni_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() does not run
    return module


def test_no_two_sources_compile_to_one_object(setup_py):
    cpp, cuda = setup_py.extension_sources()
    assert cpp and cuda, (cpp, cuda)
    assert setup_py.object_collisions(cpp + cuda) == []


def test_collisions_are_found(setup_py):
    clash = setup_py.object_collisions(["csrc/a.cpp", "csrc/a.cu", "csrc/b.cpp", "csrc/./b_cuda.cu"])
    assert clash == [["csrc/a.cpp", "csrc/a.cu"]]
    assert setup_py.object_collisions(["csrc/x.cpp", "csrc/sub/../x.cu"]) == [["csrc/x.cpp", "csrc/sub/../x.cu"]]


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _toolkit(folder: Path) -> Path:
    """A fake toolkit whose nvcc answers --dryrun as the real one does (`#$ _HERE_=<bin>`)."""
    _executable(folder / "bin" / "nvcc", f'#!/bin/sh\necho "#$ _HERE_={folder / "bin"}" >&2\n')
    (folder / "lib64").mkdir()
    (folder / "lib64" / "libcudart.so").write_bytes(b"")
    return folder


def test_cuda_home_found_behind_a_wrapper_script(setup_py, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "wrappers"  # like /usr/local/bin/nvcc: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    _executable(wrappers / "nvcc", f'#!/bin/sh\nexec {toolkit / "bin" / "nvcc"} "$@"\n')
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}/usr/bin:/bin")
    # torch's guess is the wrapper's parent, which has no libcudart; setup.py asks nvcc where it lives
    assert not (wrappers.parent / "lib64").exists()
    assert setup_py.find_cuda_home() == str(toolkit)


def test_cuda_home_from_the_environment_is_checked(setup_py, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py.find_cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    with pytest.raises(SystemExit, match=r"CUDA_HOME=.*nothing is not a CUDA toolkit"):
        setup_py.find_cuda_home()


def test_forced_cuda_without_a_toolkit_says_which_variable_to_set(setup_py, tmp_path, monkeypatch):
    """FORCE_CUDA=1 where no toolkit can be found: one line naming CUDA_HOME, before anything compiles."""
    import torch

    for var in ("CUDA_HOME", "CUDA_PATH", "SKIP_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.setenv("MAX_JOBS", "2")  # _extensions() sets it only when unset
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc
    monkeypatch.setattr(setup_py, "FALLBACK_CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # as a CUDA build of torch says
    with pytest.raises(SystemExit) as exc:
        setup_py._extensions()
    assert "FORCE_CUDA=1 but no CUDA toolkit found" in str(exc.value) and "CUDA_HOME" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_forced_cuda_with_a_cpu_torch_is_refused(setup_py, monkeypatch):
    import torch

    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.setenv("MAX_JOBS", "2")  # _extensions() sets it only when unset
    monkeypatch.delenv("SKIP_CUDA", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match="FORCE_CUDA=1 needs a CUDA build of torch"):
        setup_py._extensions()


def test_readme_gpu_install_is_what_cuda_build_runs():
    """The README's GPU install names the pinned torch and the pip flags that make cuda-build uses."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Install on a GPU machine"):].split("```")[1]
    pins = dict(line.split("==") for line in (ROOT / "csrc/check/gpu_machine.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert f"pip install torch=={pins['torch']}" in block
    assert 'FORCE_CUDA=1 pip install --no-build-isolation -e ".[train]"' in block
    script = (ROOT / "csrc/check/cuda_build.py").read_text()
    assert '"--no-build-isolation", "-c", str(PINS), "-e", f"{src}[dev,train]"' in script
    assert 'FORCE_CUDA="1"' in script
