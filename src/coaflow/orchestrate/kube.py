"""The Kubernetes API as the launch step uses it: clients from the pod's service account or the
kubeconfig, and its failures as the one-line errors of ``coaflow.errors`` (75: worth a retry;
2: fix the credentials, the permissions or the request)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from coaflow.errors import CoaflowError, ServiceUnavailable, UserError


def clients():
    """``(CustomObjectsApi, CoreV1Api)`` of the cluster this runs in (its service account), else
    of the local kubeconfig; neither is a ``UserError``."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:  # $KUBECONFIG read now: the client reads it once, when first imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except (config.ConfigException, OSError, ValueError) as e:  # none, or a broken one
            raise UserError(f"no Kubernetes credentials: not in a pod, and the kubeconfig "
                            f"($KUBECONFIG, else ~/.kube/config) gives none "
                            f"({str(e).splitlines()[0][:200]})") from None
    return client.CustomObjectsApi(), client.CoreV1Api()


def status(e: Exception) -> int | None:
    """The HTTP status of a Kubernetes API error (None: no answer at all)."""
    return getattr(e, "status", None)


def _host(api) -> str:
    return getattr(getattr(getattr(api, "api_client", None), "configuration", None), "host",
                   None) or "the Kubernetes API"


@contextlib.contextmanager
def api_errors(what: str, api=None) -> Iterator[None]:
    """A failed Kubernetes API call as its one-line error: unreachable, overloaded or a server
    error is worth a retry (75); refused credentials or permissions, or a request the API
    rejects, is bad input (2). A status the caller handles itself (404, 409) passes through."""
    try:
        yield
    except CoaflowError:
        raise
    except Exception as e:  # noqa: BLE001 - kubernetes' ApiException, urllib3's errors
        code = status(e)
        if code in (404, 409):
            raise
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
        if code in (401, 403):
            raise UserError(f"{what}: {_host(api)} refused it ({code}): check the service "
                            f"account's permissions or the kubeconfig's credentials") from None
        if code in (400, 422):
            raise UserError(f"{what}: {_host(api)} rejected it ({reason})") from None
        if code is None and not _unreachable(e):
            raise
        raise ServiceUnavailable(f"{what}: {_host(api)} did not answer ({reason}): retry "
                                 "later") from None


def _unreachable(e: Exception) -> bool:
    """A connection-level failure (urllib3's MaxRetryError, a refused or timed-out socket)."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"HTTPError", "MaxRetryError", "NewConnectionError", "ProtocolError",
                         "TimeoutError", "ConnectionError", "OSError"}) \
        or type(e).__module__.startswith("urllib3")
