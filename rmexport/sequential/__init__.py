"""Layer-by-layer pruning for models that do not fit in memory: one decoder block at a time."""

__all__: list[str] = []
