"""peft_minimal: parameter-efficient fine-tuning built from scratch, one idea per file.

Companion package of the book *PEFT from Scratch*. Each method module (``lora``, ...) has a
dataclass config and the same verbs (``add_*``, ``merge``, ``unmerge``, ``merge_and_unload``), and
describes itself to saving, loading, counting and merging with one ``METHOD`` (see ``registry``).
"""
from .io import load_adapter, save_adapter
from .layers import count_parameters, find_target_modules
from .registry import count_adapter_parameters

__all__ = ["count_adapter_parameters", "count_parameters", "find_target_modules", "load_adapter", "save_adapter"]
__version__ = "0.1.0"
