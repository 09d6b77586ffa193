"""Low-bit storage of frozen weights (NF4 for QLoRA)."""
