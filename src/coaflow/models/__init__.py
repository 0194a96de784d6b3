"""The student model: load a real one (hub id / local folder) or build the ``tiny`` one.

Imports here are light; torch and transformers load inside the functions.
"""

from coaflow.models.loading import load_model_and_tokenizer, load_tokenizer
from coaflow.models.template import CHAT_TEMPLATE
from coaflow.models.tiny import TinyModel, build_tiny, train_tokenizer

__all__ = ["CHAT_TEMPLATE", "TinyModel", "build_tiny", "load_model_and_tokenizer", "load_tokenizer",
           "train_tokenizer"]
