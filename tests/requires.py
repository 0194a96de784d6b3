"""What the tests need from outside the code, and the one rule for it.

Every Python package a test imports is installed by ``make setup`` (the ``[train,kfp,airflow,k8s,
dev]`` extras) and Debian's ``chromium`` (``make system``, part of ``make setup``). A test that misses one **fails**, naming
the command that installs it: a skip would let CI pass without the check. Only what no install
gives is skipped (user namespaces that the kernel forbids).
"""

from __future__ import annotations

import importlib
import shutil

import pytest

SETUP = "make setup (pip install -e '.[train,kfp,airflow,k8s,dev]')"


def module(name: str, install: str = SETUP):
    """The module ``name``; the test fails when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"{name} is not installed ({e}): {install}", pytrace=False)


def chromium() -> str:
    """Headless Chromium's path; the test fails when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: apt-get install chromium (make setup does)",
                    pytrace=False)
    return found
