"""Moved to ``rmexport.llamacpp`` (validation and the tokenizer rebuild use it too).

Kept only for ``bench/gguf_native.py``; delete once that imports ``rmexport.llamacpp``.
"""

from rmexport.llamacpp import *  # noqa: F403
from rmexport.llamacpp import __all__  # noqa: F401
