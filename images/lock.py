"""Lock files of the images: one fully pinned requirements file per image, from pyproject.

    python images/lock.py            # (re)write images/locks/<image>.txt with uv
    python images/lock.py --check    # resolve again and fail if a lock differs (needs PyPI)

Why: an image built from version ranges is whatever the resolver picks on build day (the GPU
image once resolved `vllm<=0.31` to a 2023 vLLM 0.1.2). Each Dockerfile installs its lock in a
layer before ``src/`` is copied, then coaflow itself with ``--no-deps``, so a code change does
not reinstall torch and two builds of one commit get the same packages.

Each lock starts with the sha256 of the requirements it was made from (pyproject's dependencies
plus the image's extras and extra lines); ``tests/test_images.py`` recomputes it offline and
fails when pyproject changed without a new lock, and checks every pinned version against
pyproject's ranges. ``--check`` re-resolves with the lock as the preference (what uv keeps
unless an input changed). The CPU images take torch's CPU build (``+cpu``): from the wheels
folder of these machines when present, else from the PyTorch CPU index.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "images" / "locks"
PYTHON, PLATFORM = "3.11", "x86_64-manylinux_2_28"
TORCH_CPU = "torch==2.13.0+cpu"  # the CPU build; the PyPI default is a multi-GB CUDA build
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LOCAL_WHEELS = Path("/opt/wheels")

# image -> (pyproject extras, extra requirement lines); the tracking image is not coaflow
IMAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cpu": (("train", "kfp", "k8s"), (TORCH_CPU,)),
    "gpu": (("train", "gpu", "kfp", "k8s"), ()),
    "airflow": (("train", "airflow"), (TORCH_CPU,)),
    "tracking": ((), ("mlflow==3.17.2", "psycopg2-binary==2.9.13", "boto3==1.44.8")),
}
NOT_COAFLOW = {"tracking"}
HASH_PREFIX = "# inputs-sha256: "


def requirements(image: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement lines an image's lock is resolved from."""
    extras, extra_lines = IMAGES[image]
    if image in NOT_COAFLOW:
        return list(extra_lines)
    project = tomllib.loads(pyproject.read_text())["project"]
    out = list(project["dependencies"])
    for extra in extras:
        out += project["optional-dependencies"][extra]
    return out + list(extra_lines)


def inputs_hash(image: str, pyproject: Path = ROOT / "pyproject.toml") -> str:
    return hashlib.sha256("\n".join(sorted(requirements(image, pyproject))).encode()).hexdigest()


def compile_lock(image: str, out: Path, uv: str = "uv") -> None:
    """Resolve ``image``'s requirements with uv into ``out`` (the old ``out`` as preference)."""
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / f"{image}.in"
        req.write_text("\n".join(requirements(image)) + "\n")
        body = Path(tmp) / f"{image}.txt"
        if out.exists():
            body.write_text(out.read_text())
        cmd = [uv, "pip", "compile", str(req), "-o", str(body), "--no-header", "-q",
               "--python-version", PYTHON, "--python-platform", PLATFORM]
        if TORCH_CPU in IMAGES[image][1]:
            cmd += (["--find-links", str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir()
                    else ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy",
                          "unsafe-best-match"])
        subprocess.run(cmd, check=True)
        lines = [ln for ln in body.read_text().splitlines()
                 if not ln.startswith(("--find-links", "--extra-index-url"))]
        lines = [ln.replace(f"{tmp}/{image}.in", f"images/lock.py {image}") for ln in lines]
    header = [f"# Lock of the {image} image: python images/lock.py (uv pip compile, Python "
              f"{PYTHON}, {PLATFORM}).", f"{HASH_PREFIX}{inputs_hash(image)}"]
    out.write_text("\n".join(header + lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a lock would change")
    parser.add_argument("--uv", default="uv")
    parser.add_argument("images", nargs="*", default=list(IMAGES))
    args = parser.parse_args(argv)
    LOCKS.mkdir(parents=True, exist_ok=True)
    stale = []
    for image in args.images:
        lock = LOCKS / f"{image}.txt"
        if not args.check:
            compile_lock(image, lock, args.uv)
            print(lock)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / lock.name
            if lock.exists():
                fresh.write_text(lock.read_text())
            compile_lock(image, fresh, args.uv)
            if not lock.exists() or fresh.read_text() != lock.read_text():
                stale.append(str(lock))
    if stale:
        print("stale locks (run python images/lock.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
