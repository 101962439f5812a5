"""HF <-> Megatron weight mapping per model family and streaming export in byte-budget buckets."""
