"""The Megatron actor: forward/backward of the policy loss over megatron's pipeline schedules.

One code path serves training and forward-only scoring (old log-probs, reference log-probs, the SPO
tracker's exact-ρ re-scoring): ``_run`` feeds micro-batches to ``get_forward_backward_func()``; the
last pipeline stage turns the final hidden states into per-token log-probs and entropy with the
chunked vocab-parallel kernel (``logprobs.py``), then either collects them (scoring) or applies the
registered policy loss (training).

Normalisation (the contract of ``LossOutput``): before any backward pass the actor evaluates the
loss function's normaliser for every micro-batch (it does not depend on the new log-probs, so it is
computed from ``old_logp``), sums them and all-reduces over the data-parallel group. Every
micro-batch then back-propagates ``loss_sum / global_normaliser`` and DP gradients are summed, so
the loss and its gradient do not depend on the micro-batch split or the DP layout.

Packing (``packing=True``): micro-batches are padding-free rows of concatenated sequences
(``packing.py``; block-diagonal causal mask on the local spec, THD ``PackedSeqParams`` with
Transformer Engine). Only the model input is packed: the log-probs come back per sequence, so the
loss, its normaliser and the metrics are those of the padded path (equal within fp32 rounding).

Bad input: a sequence longer than the model's max positions, an empty batch / micro-batch, a
loss_mask on position 0 or past a row's length → ``ValueError`` naming the row and value.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_spo.megatron import batching, packing
from megatron_spo.megatron.logprobs import chunked_logprobs_from_hidden, hidden_states_output, output_weight
from megatron_spo.megatron.model import build_model, load_hf_config, use_te_spec
from megatron_spo.megatron.optimizer import OptimSettings, build_optimizer, wrap_ddp
from megatron_spo.megatron.packed_forward import packed_forward, packed_token_logprobs


@dataclass
class LossSettings:
    """Which registered policy loss and how it is aggregated; names follow ``config.LossConfig``.

    ``kwargs`` go to the loss function (clip_low, clip_high, dual_clip, tis_cap, ...). ``kl_coef``
    adds ``kl_penalty_loss`` against ``ref_logp``; ``entropy_coef`` adds ``entropy_bonus_loss``.
    Both share the policy loss's aggregation and hence its global normaliser.
    """

    name: str = "ppo"
    agg: str = "token-mean"
    max_len: Optional[int] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def _mean_metric(metrics: Dict[str, torch.Tensor], name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    m = mask.to(torch.float64)
    metrics[name] = (values.detach().double() * m).sum()
    metrics[name + "/count"] = m.sum()


class MegatronActor:
    """A GPTModel (this rank's chunks), optionally with DDP + optimizer, and its train/score steps.

    ``initialize_parallel`` must have run. Without ``optim`` the actor is forward-only (a reference
    model or a scorer); with it, the chunks are wrapped in megatron DDP and get a Megatron optimizer.

    Args:
        hf_config: HF config (dict / PretrainedConfig / model dir). Weights start random; load them
            with ``megatron_spo.megatron.export.load_hf_weights(actor.model, ...)`` or a checkpoint.
        optim: optimizer settings, or None for forward-only.
        loss: the policy loss (``LossSettings``).
        micro_batch_tokens: token budget of one micro-batch (padded: rows x longest row; packed: rows x width).
        packing: pack sequences padding-free into the micro-batches' rows (see ``packing.py``).
        temperature: logits are divided by it before log-softmax (match the rollout sampler).
        params_dtype, aux_loss_coef, use_te, sequence_parallel: passed to ``build_model`` (SP: GPU only;
            None = as given to ``initialize_parallel``).
        config_overrides: extra ``TransformerConfig`` fields (e.g. p2p communication settings).
    """

    def __init__(
        self, hf_config: Any, *, optim: Optional[OptimSettings] = None, loss: Optional[LossSettings] = None,
        micro_batch_tokens: int = 16384, temperature: float = 1.0, params_dtype: torch.dtype = torch.float32,
        aux_loss_coef: float = 0.0, use_te: Optional[bool] = None, sequence_parallel: Optional[bool] = None,
        packing: bool = False, **config_overrides: Any,
    ) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        from megatron_spo.megatron.parallel import current_parallel_sizes

        if sequence_parallel is None:  # follow initialize_parallel's setting
            sizes = current_parallel_sizes()
            sequence_parallel = bool(sizes and sizes.sequence_parallel)
        self.hf_config = load_hf_config(hf_config)
        self.max_positions = int(self.hf_config["max_position_embeddings"])
        self.loss = loss or LossSettings()
        self.micro_batch_tokens = micro_batch_tokens
        # THD packing with TE attention; the local spec takes an explicit block-diagonal mask instead.
        self.packing, self.thd = packing, packing and (use_te_spec() if use_te is None else bool(use_te))
        if packing and parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("packing with context parallelism is not supported (cu_seqlens would need "
                             "per-rank padding); set packing off or context parallel size 1")
        self.temperature = temperature
        chunks = build_model(self.hf_config, params_dtype=params_dtype, aux_loss_coef=aux_loss_coef, use_te=use_te,
                             sequence_parallel=sequence_parallel, **config_overrides)
        # Sequence parallelism shards the sequence over TP ranks: micro-batch widths must divide.
        self.width_multiple = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        self._vpp_multiple = (parallel_state.get_pipeline_model_parallel_world_size()
                              if len(chunks) > 1 else 1)
        self.optimizer = self.scheduler = None
        if optim is not None:
            chunks = wrap_ddp(chunks, distributed_optimizer=optim.distributed_optimizer)
            self.optimizer, self.scheduler = build_optimizer(chunks, optim)
            config = _unwrap(chunks[0]).config
            # Grad sync across DP once per step (micro-batches accumulate under no_sync).
            no_sync = [c.no_sync for c in chunks]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            # Our losses are already divided by the global normaliser: finalize without the token
            # count, which megatron would otherwise divide the summed grads by again.
            config.finalize_model_grads_func = (
                lambda model, num_tokens=None, **kw: finalize_model_grads(model, None, **kw))
        self.model: List[torch.nn.Module] = chunks
        self.ps = parallel_state
        # Batches arrive on CPU; the model (and NCCL collectives) live on the current GPU if any.
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")

    def summary(self) -> str:
        """One line: parameters on this rank and the activation recompute, read back from the built model."""
        c = _unwrap(self.model[0]).config
        if c.recompute_granularity == "full":
            recompute = f"full ({c.recompute_method}, {c.recompute_num_layers} layer(s) per unit)"
        elif c.recompute_granularity == "selective":
            recompute = f"selective ({', '.join(c.recompute_modules)})"
        else:
            recompute = "off"
        params = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        return f"actor: {params:,} parameters on this rank, activation recompute {recompute}"

    # ------------------------------------------------------------------------------------------
    # micro-batching
    # ------------------------------------------------------------------------------------------
    def micro_batches(self, batch: Dict[str, torch.Tensor],
                      groups: Optional[Sequence[Sequence[int]]] = None) -> List[Dict[str, torch.Tensor]]:
        """Validate ``batch`` and split it by the token budget (or into the given row ``groups``).

        Ranks that exchange activations inside a forward (the expert-parallel group) must run the
        same number of micro-batches: the count is made equal across the DP group (MAX), then rows
        are rebalanced into exactly that many micro-batches. With virtual pipeline stages the
        micro-batches are equal-sized, padded to the batch's longest row, and their count is a
        multiple of pp (constraints of megatron's interleaved schedule). With ``packing`` the same
        count rules hold for packed micro-batches (``packing.py``; fixed [R, W] under virtual stages).
        """
        batching.validate_batch(batch, self.max_positions)
        lengths = batch["lengths"].tolist()
        if self.packing:
            return self._packed_micro_batches(batch, lengths, groups)
        fixed_width = None
        if groups is None:
            groups = batching.split_by_token_budget(lengths, self.micro_batch_tokens)
            count = self._common_count(len(groups))
            if self._vpp_multiple > 1:
                groups = batching.equal_groups(lengths, count, self._vpp_multiple)
            elif count != len(groups):
                groups = batching.balance_to_count(lengths, count)
        if self._vpp_multiple > 1:
            # megatron's interleaved schedule exchanges fixed [seq, rows, hidden] shapes between
            # virtual stages (it does not support variable_seq_lengths), so every micro-batch gets
            # the same rows and width, and the count is a multiple of pp.
            if len(groups) % self._vpp_multiple or len({len(g) for g in groups}) != 1:
                raise ValueError(f"with virtual pipeline stages micro-batches need equal sizes and a count that is "
                                 f"a multiple of pp={self._vpp_multiple}; got sizes {[len(g) for g in groups]}")
            fixed_width = max(lengths)
        mbs = batching.make_micro_batches(batch, groups, width_multiple=self.width_multiple, width=fixed_width)
        return [{k: v.to(self.device) for k, v in mb.items()} for mb in mbs]

    def _common_count(self, count: int) -> int:
        """The largest micro-batch count over the data-parallel group (every rank runs that many)."""
        count = torch.tensor([count], dtype=torch.long, device=self.device)
        if dist.is_initialized() and self.ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.ps.get_data_parallel_group())
        return int(count)

    def _packed_micro_batches(self, batch: Dict[str, torch.Tensor], lengths: List[int],
                              groups: Optional[Sequence[Sequence[int]]]) -> List[Dict[str, torch.Tensor]]:
        """``micro_batches`` with packing: the same count rules; with virtual stages fixed [R, W] shapes."""
        vpp = self._vpp_multiple
        if groups is None:
            plan = packing.plan_packing(lengths, self.micro_batch_tokens, thd=self.thd)
            count = self._common_count(len(plan))
            count = -(-count // vpp) * vpp
            if count != len(plan):
                plan = packing.rebalance(plan, count)
        else:
            plan = packing.plan_from_groups(lengths, groups, self.micro_batch_tokens, thd=self.thd)
            if len(plan) % vpp:
                raise ValueError(f"with virtual pipeline stages the micro-batch count must be a multiple of "
                                 f"pp={vpp}; got {len(plan)}")
        mbs = packing.make_packed_micro_batches(batch, plan, width_multiple=self.width_multiple,
                                                fixed_shape=vpp > 1, thd=self.thd)
        return [{k: v.to(self.device) for k, v in mb.items()} for mb in mbs]

    # ------------------------------------------------------------------------------------------
    # the shared forward path
    # ------------------------------------------------------------------------------------------
    def _token_logprobs(self, model: torch.nn.Module, hidden: torch.Tensor, mb: Dict[str, torch.Tensor]):
        """[b, t, H] final hidden states -> (logp [b, t], entropy [b, t]), position 0 = 0."""
        if "packed_src" in mb:
            return packed_token_logprobs(model, hidden, mb, self.temperature)
        ids = mb["input_ids"]
        b, t = ids.shape
        h = hidden[:, :-1].reshape(b * (t - 1), hidden.shape[-1])
        logp, ent = chunked_logprobs_from_hidden(h, output_weight(model), ids[:, 1:].reshape(-1),
                                                 temperature=self.temperature)
        zero = torch.zeros(b, 1, dtype=logp.dtype, device=logp.device)
        return torch.cat([zero, logp.view(b, t - 1)], 1), torch.cat([zero, ent.view(b, t - 1)], 1)

    def _run(self, micro_batches: List[Dict[str, torch.Tensor]], loss_closure: Optional[Callable], forward_only: bool):
        """Run megatron's schedule; returns the last stage's per-micro-batch outputs ([] elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            gpt = _unwrap(model)
            with hidden_states_output(gpt):
                if "packed_ids" in mb:
                    out = packed_forward(model, gpt, mb)
                else:
                    out = model(mb["input_ids"], mb["position_ids"], None)
            return out, functools.partial(self._loss_func, gpt, mb, loss_closure)

        n = len(self.model)
        iterators = [iter(micro_batches) for _ in range(n)]
        shapes = [mb.get("packed_ids", mb["input_ids"]).shape for mb in micro_batches]  # the model's input
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if n > 1 else iterators[0],
            model=self.model if n > 1 else self.model[0],
            num_microbatches=len(micro_batches),
            seq_length=max(shape[1] for shape in shapes),
            micro_batch_size=max(shape[0] for shape in shapes),
            forward_only=forward_only,
        )

    def _loss_func(self, gpt, mb, loss_closure, output_tensor):
        logp, entropy = self._token_logprobs(gpt, output_tensor, mb)
        num_tokens = mb["loss_mask"].sum().to(torch.int)
        if loss_closure is None:  # scoring
            return torch.zeros((), device=logp.device), num_tokens, {"logp": logp.detach(), "entropy": entropy.detach()}
        loss, metrics = loss_closure(logp, entropy, mb)
        return loss, num_tokens, metrics

    def _broadcast_from_last_stage(self, obj: Any) -> Any:
        """Pipeline ranks other than the last receive the last stage's result."""
        if self.ps.get_pipeline_model_parallel_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ps.get_pipeline_model_parallel_last_rank(),
                                   group=self.ps.get_pipeline_model_parallel_group())
        return box[0]

    # ------------------------------------------------------------------------------------------
    # forward-only scoring
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, batch: Dict[str, torch.Tensor], groups: Optional[Sequence[Sequence[int]]] = None
              ) -> Dict[str, torch.Tensor]:
        """Log-probs and entropy of every token of ``batch``: {"logp": [B, T], "entropy": [B, T]}.

        Position 0 and positions past a row's length are 0. Same forward path as training (old
        log-probs, reference log-probs, re-scoring). Every rank of the model-parallel group returns
        the result.
        """
        for chunk in self.model:
            chunk.eval()
        mbs = self.micro_batches(batch, groups)
        outs = self._run(mbs, None, forward_only=True)
        result = None
        if self.ps.is_pipeline_last_stage(ignore_virtual=True):
            shape = batch["input_ids"].shape
            cpu_mbs = [{"rows": mb["rows"].cpu()} for mb in mbs]
            result = {key: batching.scatter_rows([o[key].cpu() for o in outs], cpu_mbs, shape)
                      for key in ("logp", "entropy")}
            valid = torch.arange(shape[1]).unsqueeze(0) < batch["lengths"].unsqueeze(1)
            result = {k: v * valid for k, v in result.items()}
        for chunk in self.model:
            chunk.train()
        return self._broadcast_from_last_stage(result)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def _loss_terms(self, logp, entropy, mb) -> List[Any]:
        from megatron_spo.algos.kl import entropy_bonus_loss, kl_penalty_loss
        from megatron_spo.algos import get_loss  # the package import fills the registry

        s = self.loss
        mask = mb["loss_mask"]
        out = [get_loss(s.name)(logp, mb["old_logp"], mb["advantages"], mask, agg=s.agg, max_len=s.max_len,
                                rollout_logp=mb.get("rollout_logp"), **s.kwargs)]
        if s.kl_coef > 0:
            if mb.get("ref_logp") is None:
                raise ValueError(f"kl_coef={s.kl_coef} > 0 needs ref_logp in the batch")
            out.append(kl_penalty_loss(logp, mb["ref_logp"], mask, s.kl_coef, s.kl_estimator, s.agg, s.max_len))
        if s.entropy_coef > 0:
            out.append(entropy_bonus_loss(entropy, mask, s.entropy_coef, s.agg, s.max_len))
        return out

    def global_normaliser(self, micro_batches: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """Σ over micro-batches and DP ranks of the loss's normaliser (fp64 0-d), before any backward."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            for key in ("old_logp", "advantages"):
                if mb.get(key) is None:
                    raise KeyError(f"training batch is missing {key!r}")
            # The normaliser counts tokens/sequences; it does not depend on the new log-probs.
            old = mb["old_logp"].float()
            total += self._loss_terms(old, torch.zeros_like(old), mb)[0].normaliser.double()
        if dist.is_initialized() and self.ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        return total

    def forward_backward(self, batch: Dict[str, torch.Tensor],
                         groups: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, torch.Tensor]:
        """Accumulate the gradient of the globally normalised loss over ``batch`` (no optimizer step).

        Returns reduced metric tensors (sums with ``/count``, ``*_max``/``*_min``) over this step,
        all ranks; ``loss`` is the global loss (same on all ranks).
        """
        from megatron_spo.algos.aggregation import reduce_metrics

        if self.optimizer is None:
            raise RuntimeError("forward-only actor (built without optim) cannot train")
        mbs = self.micro_batches(batch, groups)
        norm = self.global_normaliser(mbs)
        if float(norm) <= 0:
            raise ValueError("global normaliser is 0: no trainable token (loss_mask is all 0 on every rank)")
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        def closure(logp, entropy, mb):
            terms = self._loss_terms(logp, entropy, mb)
            loss = sum(term.loss_sum for term in terms) / norm.to(logp.dtype)
            metrics = reduce_metrics([term.metrics for term in terms])
            mask = mb["loss_mask"].bool()
            ratio = torch.exp(logp.detach() - mb["old_logp"])
            _mean_metric(metrics, "actor/entropy", entropy, mask)
            # mean |logπ_θ − logπ_old|: the policy drift this update measured (SPO's accumulated ρ uses it)
            _mean_metric(metrics, "actor/abs_logratio", (logp.detach() - mb["old_logp"]).abs(), mask)
            _mean_metric(metrics, "actor/ratio_mean", ratio, mask)
            metrics["actor/ratio_max"] = torch.where(mask, ratio, -math.inf).max().double()
            metrics["actor/ratio_min"] = torch.where(mask, ratio, math.inf).min().double()
            if mb.get("ref_logp") is not None:
                from megatron_spo.algos.kl import kl_k3

                _mean_metric(metrics, "actor/kl_ref_k3", kl_k3(logp.detach(), mb["ref_logp"]), mask)
            metrics["loss"] = loss.detach().double()
            return loss, metrics

        outs = self._run(mbs, closure, forward_only=False)
        return self._reduce_metrics(outs)

    def _reduce_metrics(self, outs: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        from megatron_spo.algos.aggregation import reduce_metrics

        local = None
        if self.ps.is_pipeline_last_stage(ignore_virtual=True):
            mins = {k: torch.stack([o[k] for o in outs]).min() for k in outs[0] if k.endswith("_min")}
            local = reduce_metrics([{k: v for k, v in o.items() if not k.endswith("_min")} for o in outs])
            local.update(mins)
            local = {k: v.detach().double().cpu() for k, v in local.items()}
        local = self._broadcast_from_last_stage(local)
        if dist.is_initialized() and self.ps.get_data_parallel_world_size() > 1:
            group = self.ps.get_data_parallel_group()
            for key in sorted(local):
                op = (dist.ReduceOp.MAX if key.endswith("_max") else
                      dist.ReduceOp.MIN if key.endswith("_min") else dist.ReduceOp.SUM)
                value = local[key].double().to(self.device)
                dist.all_reduce(value, op=op, group=group)
                local[key] = value.cpu()
        return local

    def optimizer_step(self) -> Dict[str, float]:
        """Advance the LR schedule, clip by the global grad norm, step; returns lr and grad_norm.

        The scheduler is stepped first so that the k-th update (1-based) uses the warm-up LR
        ``lr * k / warmup_steps`` (megatron's order would make the first update use LR 0).
        """
        self.scheduler.step(increment=1)
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: gradients are not finite")
        lr = self.optimizer.param_groups[0]["lr"]
        return {"grad_norm": float(grad_norm), "lr": float(lr)}

    def train_step(self, batch: Dict[str, torch.Tensor],
                   groups: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, float]:
        """One optimizer step on ``batch`` (this DP rank's share). Returns finalised metrics:
        ``loss``, ``grad_norm``, ``lr``, ``actor/entropy``, ``actor/abs_logratio``, ``actor/ratio_{mean,max,min}``,
        ``actor/kl_ref_k3`` (with ref_logp), and the loss's own (e.g. ``ppo/clip_frac``, ``ppo/approx_kl_k3``).
        """
        from megatron_spo.algos.aggregation import finalize_metrics

        metrics = finalize_metrics(self.forward_backward(batch, groups))
        metrics.update(self.optimizer_step())
        return metrics
