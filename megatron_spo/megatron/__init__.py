"""The only package that imports ``megatron.core``.

Import ``megatron_spo.megatron.imports.megatron_core()`` (or any submodule here) rather than
``megatron.core`` directly: it first checks for the broken Transformer Engine meta-package, which
otherwise makes ``import megatron.core`` fail with an unhelpful RuntimeError.
"""
