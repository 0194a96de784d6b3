"""OpenAI-compatible serving: ``coaflow serve MODEL`` (a registry alias, a folder or a hub id).

``server`` resolves the model and picks the engine (vLLM on a GPU, else transformers), ``engine``
batches concurrent requests into one ``generate``, ``app`` is the HTTP API (chat completions with
tool calls and streaming, models, health, Prometheus metrics). Heavy imports stay inside.
"""
