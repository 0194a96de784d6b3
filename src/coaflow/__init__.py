"""coaflow: the Chain-of-Agents recipe for agent foundation models, as an MLOps pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("coaflow")  # pyproject.toml's, as installed
except PackageNotFoundError:  # source on sys.path, never installed
    __version__ = "0+unknown"
