"""Name a model any way a user would, get a backend for it.

``resolve_model(spec)`` accepts a local HF folder, a hub id, a registry URI
``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (downloaded from MLflow into a local folder),
or an ``http(s)://HOST/v1`` OpenAI-compatible endpoint (returned as is; ``URL#model`` names the
served model, else the endpoint's first). ``make_backend`` builds the matching backend.
"""

from __future__ import annotations

from pathlib import Path

from coaflow.errors import PipelineError


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def resolve_model(spec: str, *, tracking_uri: str | None = None,
                  download_dir: str | Path | None = None) -> str:
    """A folder, hub id or endpoint URL for ``spec``; registry URIs are downloaded first."""
    if is_endpoint(spec) or not spec.startswith("models:/"):
        return spec
    import mlflow
    from mlflow.exceptions import MlflowException

    from coaflow.tracking import scoped_uri

    try:
        with scoped_uri(tracking_uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=spec, dst_path=str(download_dir) if download_dir else None)
    except MlflowException as e:
        raise PipelineError(f"model {spec!r}: {str(e).splitlines()[0]}") from None
    folders = sorted((p.parent for p in Path(local).rglob("config.json")), key=lambda p: len(p.parts))
    if not folders:
        raise PipelineError(f"model {spec!r}: the downloaded artifacts at {local} hold no Hugging "
                            "Face model folder (no config.json)")
    return str(folders[0])


def make_backend(spec: str, *, batch_size: int = 16, concurrency: int = 16,
                 api_key: str | None = None, timeout_s: float = 120.0, max_retries: int = 5,
                 tracking_uri: str | None = None, download_dir: str | Path | None = None,
                 dtype: str | None = None, threads: int | None = None, field: str = "model"):
    """``TransformersBackend`` for a folder / hub id / registry URI, ``OpenAIBackend`` for a URL."""
    if is_endpoint(spec):
        from coaflow.agent.openai import OpenAIBackend

        url, _, served = spec.partition("#")
        return OpenAIBackend(url, served or None, api_key, concurrency=concurrency,
                             timeout_s=timeout_s, max_retries=max_retries)
    from coaflow.agent.hf import TransformersBackend

    return TransformersBackend(resolve_model(spec, tracking_uri=tracking_uri,
                                             download_dir=download_dir),
                               batch_size=batch_size, dtype=dtype, threads=threads,
                               field=field)
