"""Name a model any way a user would, get a backend for it.

``resolve_model(spec)`` accepts a local HF folder, a hub id, a registry URI
``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (downloaded from MLflow into a local folder),
or an ``http(s)://HOST/v1`` OpenAI-compatible endpoint (returned as is; ``URL#model`` names the
served model, else the endpoint's first). ``make_backend`` builds the matching backend.
"""

from __future__ import annotations

from pathlib import Path


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def resolve_model(spec: str, *, registry_uri: str | None = None,
                  download_dir: str | Path | None = None) -> str:
    """A folder, hub id or endpoint URL for ``spec``; registry URIs are downloaded first from
    the registry at ``registry_uri`` (``registry.registry_uri``: the run's)."""
    if is_endpoint(spec) or not spec.startswith("models:/"):
        return spec
    import tempfile

    from coaflow.registry import Registry
    from coaflow.registry import registry_uri as default_registry

    registry = Registry(registry_uri or default_registry("."))
    folder, _ = registry.fetch(spec, download_dir or tempfile.mkdtemp(prefix="coaflow-model-"))
    return str(folder)


def make_backend(spec: str, *, batch_size: int = 16, concurrency: int = 16,
                 api_key: str | None = None, timeout_s: float = 120.0, max_retries: int = 5,
                 registry_uri: str | None = None, download_dir: str | Path | None = None,
                 dtype: str | None = None, threads: int | None = None, field: str = "model"):
    """``TransformersBackend`` for a folder / hub id / registry URI, ``OpenAIBackend`` for a URL."""
    if is_endpoint(spec):
        from coaflow.agent.openai import OpenAIBackend

        url, _, served = spec.partition("#")
        return OpenAIBackend(url, served or None, api_key, concurrency=concurrency,
                             timeout_s=timeout_s, max_retries=max_retries)
    from coaflow.agent.hf import TransformersBackend

    return TransformersBackend(resolve_model(spec, registry_uri=registry_uri,
                                             download_dir=download_dir),
                               batch_size=batch_size, dtype=dtype, threads=threads,
                               field=field)
