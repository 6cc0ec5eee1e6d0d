"""Installing for a GPU, checked on CPU.

* The `gpu` extra installs from wheels only (flash-attn, an sdist on PyPI that compiles CUDA, was in it).
* `make setup VENV_ARGS=--system-site-packages` sees a CUDA torch that lives in python3's own venv
  (the lent GPU machines' python3 is /opt/torch/.venv's): emulated with a marker package.
* gpu_check.sh's carried wheels complete the lent GPU image (device KINDS.md's package list) to
  everything the check imports: emulated by an environment holding only the image's packages, the
  carried wheels installed over it with --target by the script's own set-up, then imports and a step.

The tests that need the package registry skip without it; the emulated image is cached between runs
(PROLONG_GPU_IMAGE_CACHE, default ~/.cache/prolong-recipes/gpu-image).
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from functools import cache
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"

# Packages of the lent GPU image ('cuda', device KINDS.md, read 2026-11-17): no others are there.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
# Versions the image was seen with. torch 2.11+cu130 is stood in for by this machine's CPU torch, and
# numpy 2.5.2 (Python >= 3.12 only) by the newest numpy for this Python.
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "tokenizers": "0.23.2",
                  "torch": "2.13.0", "transformers": "5.17.0", "triton": "3.6.0"}
# The image's pytest plugins: installed so that PYTEST_DISABLE_PLUGIN_AUTOLOAD has something to keep out.
IMAGE_PYTEST_PLUGINS = ["pytest-benchmark", "pytest-cov", "pytest-mock", "pytest-timeout", "pytest-xdist", "hypothesis"]

# Packages allowed in the gpu extra: each publishes wheels for Linux x86_64 (pure Python or binary),
# so `pip install -e .[gpu]` compiles nothing. Add a package here only with
# test_the_gpu_extra_resolves_to_wheels_only passing for it.
WHEEL_ONLY_GPU_PACKAGES = {"liger-kernel"}


def _extras(name: str) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [Requirement(line) for line in cfg["options.extras_require"][name].split("\n") if line.strip()]


def _install_requires() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in cfg["options"]["install_requires"].split("\n")]
    return [Requirement(line) for line in lines if line]


@cache
def _registry_reachable() -> bool:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        urllib.request.urlopen(f"{index}/pip/", timeout=15).close()
        return True
    except OSError:
        return False


needs_registry = pytest.mark.skipif("not _registry_reachable()", reason="the package registry is not reachable")


def _pip_env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _manylinux_flags(python_version: str) -> list[str]:
    """A CPython `python_version` on an x86_64 machine with glibc 2.35 (pip matches manylinux_2_N exactly)."""
    flags = ["--python-version", python_version, "--implementation", "cp", "--platform", "manylinux2014_x86_64"]
    for n in range(17, 36):
        flags += ["--platform", f"manylinux_2_{n}_x86_64"]
    return flags


def test_the_gpu_extra_lists_only_packages_with_wheels():
    """Offline rule: the extra may name only packages known to ship wheels (flash-attn is an sdist on
    PyPI that compiles CUDA for hours or fails under build isolation; it is optional, README)."""
    names = {canonicalize_name(r.name) for r in _extras("gpu")}
    assert names <= WHEEL_ONLY_GPU_PACKAGES, f"not known to ship wheels: {sorted(names - WHEEL_ONLY_GPU_PACKAGES)}"


@pytest.mark.slow
@needs_registry
def test_the_gpu_extra_resolves_to_wheels_only(tmp_path):
    """`pip install -e .[gpu]` on a CUDA machine (Linux x86_64, CPython 3.12): pip's resolver, in a dry
    run that accepts wheels only, finds every requirement of the package and its gpu extra."""
    requirements = [str(r) for r in _install_requires() + _extras("gpu")]
    report = tmp_path / "report.json"
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
         *_manylinux_flags("3.12"), "--target", str(tmp_path / "target"), "--report", str(report), *requirements],
        capture_output=True, text=True, timeout=600, env=_pip_env())
    assert completed.returncode == 0, completed.stderr[-3000:]
    installed = {canonicalize_name(i["metadata"]["name"]): i["download_info"]["url"]
                 for i in json.loads(report.read_text())["install"]}
    assert {"torch", "liger-kernel", "triton", "transformers"} <= set(installed)
    assert all(url.endswith(".whl") for url in installed.values())


def test_make_setup_sees_the_outer_venvs_packages_when_python3_is_a_venv(tmp_path):
    """`python3 -m venv --system-site-packages` from a venv's python3 reaches the BASE interpreter's
    packages, not that venv's, so a CUDA torch installed there was invisible and the CPU torch went
    in. Emulated: an outer venv holds a marker package standing in for that torch; `make setup` with
    PYTHON = its python must give a venv that imports it (the set-up stops right after, with pip
    offline); without --system-site-packages the new venv stays isolated."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "outer")], check=True)
    outer_python = tmp_path / "outer" / "bin" / "python"
    site = subprocess.run([str(outer_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    marker = Path(site) / "prolong_outer_venv_marker"
    marker.mkdir()
    (marker / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "MAKE"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")  # the set-up's installs fail at once

    def make_setup(venv: str, venv_args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-C", str(ROOT), "setup", f"VENV={tmp_path / venv}", f"PYTHON={outer_python}",
             f"VENV_ARGS={venv_args}", "TORCH_SPEC=prolong-no-such-package"],
            capture_output=True, text=True, timeout=120, env=env)

    def imports_marker(venv: str) -> bool:
        return subprocess.run([str(tmp_path / venv / "bin" / "python"), "-c", "import prolong_outer_venv_marker"],
                              capture_output=True).returncode == 0

    completed = make_setup("inner", "--system-site-packages --without-pip")
    assert (tmp_path / "inner" / "bin" / "python").exists(), completed.stderr
    assert imports_marker("inner"), completed.stdout + completed.stderr
    make_setup("isolated", "--without-pip")
    assert not imports_marker("isolated")


# ---------------------------------------------------------------------------------------------------
# gpu_check.sh's carried wheels over the lent image


def _carried_specs() -> list[str]:
    text = GPU_CHECK.read_text()
    return text.split('WHEELS="', 1)[1].split('"', 1)[0].split()


def _wheels_dir(python_version: str) -> Path:
    """One folder per carried set and Python version: pip skips the files already there."""
    key = hashlib.sha256(" ".join(_carried_specs()).encode()).hexdigest()[:12]
    return _cache_dir() / f"wheels-{python_version}-{key}"


def _fetch_wheels(directory: Path, python_version: str) -> list[Path]:
    """`gpu_check.sh --fetch-wheels` for this Python version."""
    completed = subprocess.run(["bash", str(GPU_CHECK), "--fetch-wheels"], capture_output=True, text=True,
                               timeout=600, env={**_pip_env(), "WHEELS_DIR": str(directory),
                                                 "GPU_PYTHON_VERSION": python_version})
    assert completed.returncode == 0, completed.stderr[-3000:]
    wheels = sorted(directory.glob("*.whl"))
    names = [canonicalize_name(w.name.split("-")[0]) for w in wheels]
    assert len(names) == len(set(names)) == len(_carried_specs()), names  # one version of each
    return wheels


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    return [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]


def _needed(requirement: Requirement, python_version: str) -> bool:
    """Required on the GPU machine: no extra, and its marker true for CPython `python_version` on Linux."""
    if requirement.marker is None:
        return True
    env = {**default_environment(), "python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    return requirement.marker.evaluate(env)


def _missing_from_image(wheels: list[Path], python_version: str) -> dict[str, list[str]]:
    """{carried wheel: its requirements that neither the image nor the carried set provides}."""
    have = set(map(canonicalize_name, IMAGE)) | {canonicalize_name(w.name.split("-")[0]) for w in wheels}
    missing = {}
    for wheel in wheels:
        absent = [r.name for r in _wheel_requirements(wheel)
                  if _needed(r, python_version) and canonicalize_name(r.name) not in have]
        if absent:
            missing[wheel.name] = absent
    return missing


def _cache_dir() -> Path:
    return Path(os.environ.get("PROLONG_GPU_IMAGE_CACHE", Path.home() / ".cache" / "prolong-recipes" / "gpu-image"))


def _build_image(wheels: list[Path]) -> Path:
    """A venv holding only image packages: those the carried wheels (and torch, the image's pytest
    plugins) need, resolved by pip, then everything not in the image dropped and the rest installed
    without dependencies. Returns its python."""
    roots = {canonicalize_name(r.name) for w in wheels for r in _wheel_requirements(w) if _needed(r, "3.11")}
    roots |= {canonicalize_name(w.name.split("-")[0]) for w in wheels}
    roots = sorted((roots & set(map(canonicalize_name, IMAGE))) | {"torch", "triton", *IMAGE_PYTEST_PLUGINS})
    specs = [f"{name}=={IMAGE_VERSIONS[name]}" if name in IMAGE_VERSIONS else name for name in roots]
    key = hashlib.sha256(json.dumps([specs, IMAGE, sys.version]).encode()).hexdigest()[:16]
    venv = _cache_dir() / f"image-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    report = venv / "resolved.json"
    pip = [str(python), "-m", "pip", "install", "--only-binary=:all:"]
    resolved = subprocess.run([*pip, "--dry-run", "--ignore-installed", "--report", str(report), *specs],
                              capture_output=True, text=True, timeout=900, env=_pip_env())
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    chosen = [(canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"])
              for i in json.loads(report.read_text())["install"]]
    image = set(map(canonicalize_name, IMAGE))
    (venv / "left-out.txt").write_text("\n".join(n for n, _ in chosen if n not in image) + "\n")
    installed = subprocess.run([*pip, "--no-deps", "--no-compile", *(f"{n}=={v}" for n, v in chosen if n in image)],
                               capture_output=True, text=True, timeout=1800, env=_pip_env())
    assert installed.returncode == 0, installed.stderr[-3000:]
    (venv / ".complete").touch()
    return python


@pytest.mark.slow
@needs_registry
def test_the_carried_wheels_need_nothing_the_image_lacks(tmp_path):
    """Every requirement of every carried wheel (for the lent machines' Python 3.12) is in the image or
    carried: huggingface-hub 2.4 needs httpx2, which needs httpcore2 and truststore (not carried)."""
    wheels = _fetch_wheels(_wheels_dir("3.12"), "3.12")
    assert _missing_from_image(wheels, "3.12") == {}


@pytest.mark.slow
@needs_registry
@pytest.mark.skipif(not os.environ.get("PROLONG_EMULATE_GPU_IMAGE"),
                    reason="downloads and installs the lent image's packages (1.8 GB, minutes): "
                    "PROLONG_EMULATE_GPU_IMAGE=1 pytest tests/test_gpu_install.py")
def test_gpu_check_set_up_over_the_emulated_image_imports_everything(tmp_path):
    """The lent image emulated (its packages only, this machine's Python and CPU torch), gpu_check.sh's
    own set-up installs the carried wheels over it with --target and imports every module the steps
    import; it must stop at the CUDA check only. Then, in that environment, the script's GPU-test
    step runs (with the image's pytest plugins kept out), and a benchmark step of TRL's trainer (the
    lazy imports of a run: datasets' workers, accelerate) runs."""
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels_dir = _wheels_dir(python_version)
    wheels = _fetch_wheels(wheels_dir, python_version)
    python = _build_image(wheels)
    site = tmp_path / "site"
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ONLY")}
    completed = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=1800,
                               env={**env, "ONLY": "setup test_gpu", "GPU_PYTHON": str(python), "GPU_SITE": str(site),
                                    "WHEELS_DIR": str(wheels_dir), "RESULTS_DIR": str(results),
                                    "CAP_SCALE": "10"})  # imports on a small, shared CPU machine
    log = next(results.glob("gpu-check-*.log")).read_text()
    assert "FAILED setup" in completed.stderr and "AssertionError: no CUDA" in log, log[-3000:]
    assert re.search(r"imported \d+ modules; torch 2\.13", log), log[-3000:]
    assert not re.search(r"(ModuleNotFound|Import)Error", log), log[-3000:]
    assert "OK test_gpu" in completed.stderr and re.search(r"\d+ skipped", log), log[-3000:]  # no CUDA: all skip

    run_env = {**env, "PYTHONPATH": f"{ROOT}:{site}", "TOKENIZERS_PARALLELISM": "false"}
    bench = subprocess.run([str(python), "benchmarks/bench_train.py", "--cpu", "--shape", "tiny", "--lengths", "64",
                            "--methods", "trl-padding-free", "--warmup", "0", "--steps", "1",
                            "--repeats", "1", "--json", str(tmp_path / "bench.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=run_env)
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["ok"], rows
