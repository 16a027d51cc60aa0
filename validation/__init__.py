"""Checks that a deployable computes what the pruned model computes, and how well and fast."""
