"""CPU shims that let unmodified megatron-core run on gloo when CUDA is absent.

megatron-core hard-codes ``torch.cuda`` calls in places that have nothing CUDA-specific about the
maths (buffer allocation, RNG bookkeeping, stream handles, a type assert). On a CPU-only torch these
raise ``AssertionError: Torch not compiled with CUDA enabled``. Each shim below replaces exactly one
such call site and says why (docs/megatron_on_cpu.md lists what was measured, shim by shim).

Contract:
* ``apply_cpu_shims()`` is the only public entry point. It does nothing when CUDA is available, and
  it is idempotent (a second call is a no-op).
* No other module of the project knows about these shims: everything else calls megatron-core as on a
  GPU, and ``parallel.initialize_parallel`` calls ``apply_cpu_shims()`` before building anything.
* The shims are process-wide (they patch ``torch.cuda`` attributes and megatron functions) because
  megatron reaches those names from many modules; they are only ever installed in a process that
  has no CUDA, where the patched calls would otherwise always fail.

Checked against megatron-core 0.16.1; the same call sites exist in 0.19.x (docs/megatron_on_cpu.md §0).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any, Callable, List

import torch

_APPLIED = False
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------
# 1. patch_cuda_api: the torch.cuda handles megatron touches, made CPU-valid.
# ----------------------------------------------------------------------------------------------
class _Completed:
    """What a CPU stream and event have in common: any constructor arguments are accepted and
    ignored, and the work is always complete (CPU ops are synchronous), so synchronising is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _DummyStream(_Completed):
    """Stands in for ``torch.cuda.Stream``: on CPU every op is synchronous, so waits are no-ops.

    Used by the MoE alltoall dispatcher (a side stream for device-to-host copies), the PP schedules
    and DDP (communication streams).
    """

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_DummyEvent":
        return event if event is not None else _DummyEvent()

    def __enter__(self) -> "_DummyStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _DummyEvent(_Completed):
    """Stands in for ``torch.cuda.Event`` (timers, stream ordering); CPU work is already ordered."""

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")`` or an int) to cpu."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrite ``device="cuda"`` (or an int device) in torch factory calls to cpu.

    megatron allocates with ``torch.zeros(..., device="cuda")`` / ``device=torch.cuda.current_device()``
    in the PP schedules, p2p communication, clip-grad and optimizer code. The maths is the same on CPU.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func in (torch.Tensor.to,) and args:
            args = tuple(_cpu_device(a) if i > 0 else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _patch_cuda_api() -> None:
    cuda = torch.cuda
    # RoPE (`inv_freq.to(torch.cuda.current_device())`), GlobalMemoryBuffer, the MoE router and
    # experts allocate on the current device. Returning the *string* "cpu" (not 0) matters: an int
    # would be read as an accelerator index inside autograd backward, where no TorchFunctionMode runs.
    cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    cuda.Stream = _DummyStream  # type: ignore[assignment,misc]
    cuda.Event = _DummyEvent  # type: ignore[assignment,misc]
    cuda.current_stream = lambda *a, **k: _DummyStream()  # type: ignore[assignment]
    cuda.default_stream = lambda *a, **k: _DummyStream()  # type: ignore[assignment]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    # Schedules, dist_checkpointing and timers synchronise the device; CPU ops are synchronous.
    cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # LanguageModule moves tied embeddings with `weight.data.cuda()`; DDP/dispatchers record streams.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    torch.Tensor.record_stream = lambda self, *a, **k: None  # type: ignore[assignment]
    _CudaToCpuMode().__enter__()  # pushed for the life of the process (see module docstring)


# ----------------------------------------------------------------------------------------------
# 2. patch_rng_tracker: megatron's model-parallel RNG tracker on CPU generator states.
# ----------------------------------------------------------------------------------------------
def _patch_rng_tracker() -> None:
    """``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` read/write the CUDA
    generator. Keep the tracker's named states as CPU generator states instead, so weight init in TP
    regions and dropout inside ``fork()`` draw from the per-rank streams megatron intends."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker_cls = random.CudaRNGStatesTracker

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self: Any, name: str = random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    tracker_cls.add = add
    tracker_cls.fork = fork


# ----------------------------------------------------------------------------------------------
# 3. patch_moe_te_gemm: megatron-core 0.16.1 names `te_general_gemm` only when TE imports.
# ----------------------------------------------------------------------------------------------
def _patch_moe_te_gemm() -> None:
    """The MoE router's fp32 gemm checks ``te_general_gemm is not None``; without TE the name is
    undefined in 0.16.1 (NameError). Define it as None so the torch matmul path is taken."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ----------------------------------------------------------------------------------------------
# 4. patch_moe_splits: alltoall split sizes must be Python ints on CPU too.
# ----------------------------------------------------------------------------------------------
def _patch_moe_splits() -> None:
    """``maybe_move_tensor_to_cpu(as_numpy=True)`` only converts CUDA tensors; on CPU the split sizes
    stay tensors and ``all_to_all_single`` rejects them. Convert CPU tensors the same way."""
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    original = dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ----------------------------------------------------------------------------------------------
# 5. patch_clip_grad: megatron's clip asserts `param.grad.type() == 'torch.cuda.FloatTensor'`.
# ----------------------------------------------------------------------------------------------
def _patch_clip_grad() -> None:
    """Gradient clipping: megatron computes the global norm (over DP/TP/PP/EP groups) correctly on
    CPU, then ``clip_grad_by_total_norm_fp32`` asserts CUDA grads before scaling them. Replace that
    one function (as imported by the optimizer) with the same scaling without the type assert."""
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")

    def clip_grad_by_total_norm_fp32(
        parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
    ) -> None:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads: List[torch.Tensor] = []
        for param in parameters:
            grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
            if grad is not None:
                if grad.dtype != torch.float32:
                    raise TypeError(f"clip_grad expects fp32 main grads, got {grad.dtype}")
                grads.append(clip_grads.to_local_if_dtensor(grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)  # same epsilon as megatron
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


# ----------------------------------------------------------------------------------------------
# 6. patch_checkpoint_rng: activation recompute saves and restores the CUDA generator.
# ----------------------------------------------------------------------------------------------
def _patch_checkpoint_rng() -> None:
    """Activation recompute (``tensor_parallel.checkpoint``) saves every generator's state before the
    forward and restores it for the recompute in the backward, so dropout draws the same masks twice.
    On CPU the generators are the CPU one (which the same code already saves and restores) and the
    tracker's named states (CPU states, shim 2): the CUDA part has nothing to save. An empty state out,
    nothing in."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def get_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
        return None

    random._get_cuda_rng_state = get_cuda_rng_state
    random._set_cuda_rng_state = set_cuda_rng_state

    # The recompute runs inside the autograd backward, where the process-wide mode of shim 1 is not
    # active: run it under that mode too, so its `device="cuda"` allocations land on the CPU.
    def under_cpu_mode(fn: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with _CudaToCpuMode():
                return fn(*args, **kwargs)

        return wrapped

    random.CheckpointFunction.backward = staticmethod(under_cpu_mode(random.CheckpointFunction.backward))
    random.CheckpointWithoutOutput._recompute = under_cpu_mode(random.CheckpointWithoutOutput._recompute)


def apply_cpu_shims() -> bool:
    """Install the CPU shims once if CUDA is absent. Returns True if shims are (now) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        from megatron_spo.megatron.imports import megatron_core

        megatron_core()
        _patch_cuda_api()
        _patch_rng_tracker()
        _patch_moe_te_gemm()
        _patch_moe_splits()
        _patch_clip_grad()
        _patch_checkpoint_rng()
        _APPLIED = True
    return True
