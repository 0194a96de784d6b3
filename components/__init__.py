"""Kubeflow Pipelines: the coaflow pipeline and its compiled YAML."""
