"""Which GPU holds each block when the weights stay resident on several GPUs.

accelerate's ``infer_auto_device_map`` sizes the blocks in the compute dtype and hands them out over
the GPUs in order, never splitting one, after ``get_balanced_memory`` has spread them evenly. The
embedding, the final norm and the LM head stay on the first GPU with the activations, so its share
is reduced by what they take first. Hidden states move to a block's GPU and back (``Engine``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["place_blocks"]


def place_blocks(
    blocks: nn.ModuleList, memory: dict[int, int], dtype: torch.dtype, reserved: int
) -> list[torch.device] | None:
    """The GPU of every block of ``blocks`` (a meta-device module list), given each GPU's bytes in
    ``memory`` and ``reserved`` bytes kept free on the first one; None when they do not all fit."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if len(memory) < 2 or len(blocks) == 0:
        return None
    first = min(memory)
    available = dict(memory) | {first: max(0, memory[first] - reserved)}
    whole = {"no_split_module_classes": [type(blocks[0]).__name__], "dtype": dtype}
    balanced = get_balanced_memory(blocks, max_memory=available, **whole)
    device_map = infer_auto_device_map(blocks, max_memory=balanced, **whole)
    devices = [_lookup(device_map, str(i)) for i in range(len(blocks))]
    if not all(isinstance(d, int) for d in devices):
        return None
    return [torch.device("cuda", d) for d in devices]


def _lookup(device_map: dict[str, int | str], path: str) -> int | str | None:
    """The device of module ``path``: its own entry or its nearest ancestor's (``""`` is the root)."""
    parts = path.split(".")
    for k in range(len(parts), -1, -1):
        key = ".".join(parts[:k])
        if key in device_map:
            return device_map[key]
    return None
