"""Multi-agent teachers: scripted (offline) and LLM (OpenAI-compatible), and distillation."""
