"""Data: loading through `datasets`, task formatting, batching, and a synthetic task generator."""
