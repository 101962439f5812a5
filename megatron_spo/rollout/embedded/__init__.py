"""The embedded CPU rollout engine (``engine``: :class:`EmbeddedEngine`) and its HTTP test server
(``server``), which speaks the SGLang and vLLM protocols the real clients use."""
