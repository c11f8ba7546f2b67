"""peft_minimal: parameter-efficient fine-tuning built from scratch, one idea per file.

Companion package of the book *PEFT from Scratch*. Each method module (``lora``, ...) has a
dataclass config and the same verbs (``add_*``, ``merge``, ``unmerge``, ``merge_and_unload``).
"""
from .io import load_adapter, save_adapter
from .layers import count_parameters, find_target_modules

__all__ = ["count_parameters", "find_target_modules", "load_adapter", "save_adapter"]
__version__ = "0.1.0"
