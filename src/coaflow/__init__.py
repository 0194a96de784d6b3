"""coaflow: the Chain-of-Agents recipe for agent foundation models, as an MLOps pipeline."""

__version__ = "0.1.0"
