"""Tiny models and tokenizers built from configs at run time (tests and the CPU demo; nothing is downloaded)."""
