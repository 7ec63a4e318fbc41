"""Training objectives as pure functions: tensors in, tensors out (see docs/losses.md)."""
