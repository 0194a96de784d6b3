"""The student model: load a real one (hub id / local folder) or build the ``tiny`` one.

Imports here are light; torch and transformers load inside the functions.
"""

from coaflow.models.loading import load_model_and_tokenizer, load_tokenizer
from coaflow.models.template import CHAT_TEMPLATE
from coaflow.models.tiny import TinyModel, build_tiny, train_tokenizer
from coaflow.models.toolcalls import grounded_tool_call, parse_tool_calls, well_formed_tool_call

__all__ = ["CHAT_TEMPLATE", "TinyModel", "build_tiny", "grounded_tool_call",
           "load_model_and_tokenizer",
           "load_tokenizer", "parse_tool_calls", "train_tokenizer", "well_formed_tool_call"]
