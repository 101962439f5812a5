"""vLLM worker extension: weight-update methods reached through ``POST /collective_rpc``.

Launch vLLM with ``--worker-extension-cls megatron_spo.rollout.vllm_worker_ext.WorkerExtension``
(and ``VLLM_SERVER_DEV_MODE=1`` so ``/collective_rpc`` exists). vLLM mixes this class into each
worker, so ``self`` is the worker and ``self.model_runner.model`` the loaded model, whose
``load_weights`` takes HF-named ``(name, tensor)`` pairs — the same names our streaming export
produces (on newer vLLM through ``model_runner.reload_weights``). ``/collective_rpc`` only passes string arguments, so weights travel by path: an HF
checkpoint directory written by the trainer (works on CPU; on a shared filesystem across nodes).

This module must import without vLLM (the embedded server lists :data:`RPC_METHODS` from it).
"""

from __future__ import annotations

from typing import Optional

# Methods the embedded server's /collective_rpc emulates with the same argument strings.
RPC_METHODS = ("update_weights_from_disk", "get_weight_version")


class WorkerExtension:
    """Mixed into vLLM's worker; methods run in every worker process (one result each)."""

    _mspo_weight_version: Optional[str] = None

    def update_weights_from_disk(self, path: str, version: Optional[str] = None) -> str:
        """Load every tensor of the HF checkpoint at ``path`` into the running model in place.

        Returns the new weight version string (``version``, or the previous one + 1).
        """
        from megatron_spo.rollout.weight_formats import load_hf_state

        state = load_hf_state(path)
        runner = self.model_runner  # type: ignore[attr-defined]  (provided by the vLLM worker)
        if hasattr(runner, "reload_weights"):
            # vLLM >= 0.1x: in-place reload that re-runs process_weights_after_loading. Needed on CPU,
            # where loading repacks some linear weights (a plain load_weights then sees empty params).
            runner.reload_weights(weights_iterator=iter(state.items()))
        else:
            runner.model.load_weights(weights=list(state.items()))
        if version is None:
            version = str(int(self._mspo_weight_version or 0) + 1)
        self._mspo_weight_version = str(version)
        return self._mspo_weight_version

    def get_weight_version(self) -> str:
        return str(self._mspo_weight_version or 0)
