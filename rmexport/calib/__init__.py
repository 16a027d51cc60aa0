"""Calibration and evaluation text: loading, the fixed held-out split, and token batches."""
