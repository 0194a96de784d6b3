"""Quality gates for trajectories: structural validators, content filters (correctness, tool-use
sanity, exact/near duplicates, decontamination) and the Great Expectations batch suite.

``core.gate(input, out, cfg)`` runs them all; ``coaflow.stages.gate`` wraps it as a stage and as
``coaflow gate --input ... --output ...``.
"""
