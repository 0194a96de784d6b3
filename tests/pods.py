"""A pod as the API server receives it, for tests that read the pods the engines build."""


def pod_manifest(pod) -> dict:
    """A ``V1Pod`` (``orchestrate.airflow_pods.pod_spec``) as the JSON the API server receives."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)
