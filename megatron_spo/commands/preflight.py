"""Preflight checks before a (multi-node) run: fail fast, with a clear message, instead of hanging.

Checks, each reported as one line ``[ok|FAIL] what: detail``:
- imports: torch, megatron-core (through the guarded import that detects the broken Transformer
  Engine meta-package), transformers;
- launcher environment: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are consistent
  (when launched by torchrun or srun), and WORLD_SIZE is divisible by TP × PP × CP and ETP × EP × PP;
- model layout: TP, PP (× VPP), EP and ETP divide the heads, KV heads, vocabulary, layers and experts of
  ``model.path``'s config.json (:mod:`megatron_spo.trainer.layout`, the check the trainer runs at start);
- devices: CUDA visible where the parallel layout needs it (sequence parallel, distributed optimizer);
- reachability: every rollout server URL and the sandbox answer ``GET /health`` within a timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional

from megatron_spo.config import Config
from megatron_spo.trainer import layout


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"[{'ok' if self.ok else 'FAIL'}] {self.name}: {self.detail}"


def check_imports() -> List[Check]:
    out = []
    try:
        import torch

        out.append(Check("torch", True, f"{torch.__version__} (cuda available: {torch.cuda.is_available()})"))
    except ImportError as err:
        out.append(Check("torch", False, str(err)))
    try:
        from megatron_spo.megatron.imports import megatron_core

        core = megatron_core()
        version = getattr(getattr(core, "package_info", None), "__version__", "unknown")
        out.append(Check("megatron-core", True, str(version)))
    except Exception as err:  # ImportError or the broken-TE RuntimeError: both end the run
        out.append(Check("megatron-core", False, str(err)))
    try:
        import transformers

        out.append(Check("transformers", True, transformers.__version__))
    except ImportError as err:
        out.append(Check("transformers", False, str(err)))
    return out


def check_launch_env(cfg: Config, env: Mapping[str, str] = os.environ) -> List[Check]:
    """Rank variables set by torchrun / srun, and the parallel layout against the world size."""
    world = int(env.get("WORLD_SIZE", "1"))
    out = []
    if "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            out.append(Check("launcher", False, f"WORLD_SIZE={world} is set but {', '.join(missing)} is not; "
                                                "launch with torchrun (see slurm/train.sbatch)"))
        else:
            rank = int(env["RANK"])
            ok = 0 <= rank < world
            out.append(Check("launcher", ok, f"rank {rank} of {world}, master {env['MASTER_ADDR']}:{env['MASTER_PORT']}"))
    else:
        out.append(Check("launcher", True, "single process (no WORLD_SIZE)"))
    p = cfg.parallel
    dense = layout.dense_grid_problem(p, world)
    dp = world // (p.tensor * p.pipeline * p.context)
    out.append(Check("parallel layout", dense is None,
                     dense or f"world {world} = TP {p.tensor} x PP {p.pipeline} x CP {p.context} x DP {dp}"))
    expert = layout.expert_grid_problem(p, world)
    if p.expert > 1 or (expert and not dense):  # with EP 1 and ETP = TP it only repeats the dense grid's failure
        etp = p.tensor if p.expert_tensor is None else p.expert_tensor
        edp = world // (etp * p.expert * p.pipeline)
        out.append(Check("expert parallel", expert is None,
                         expert or f"world {world} = ETP {etp} x EP {p.expert} x PP {p.pipeline} x expert-DP {edp}"))
    return out


def check_model_layout(cfg: Config) -> Check:
    """The parallel layout against ``model.path``'s config.json (heads, KV heads, vocab, layers, experts).

    Not checked (and not failed) when ``model.path`` is unset or has no config.json on this node, as when
    preflight only checks the servers; the trainer refuses a missing config.json at start.
    """
    path = Path(cfg.model.path)
    if not cfg.model.path or not ((path / "config.json").is_file() or path.is_file()):
        where = f"no config.json under model.path={cfg.model.path}" if cfg.model.path else "model.path is not set"
        return Check("model layout", True, f"not checked: {where}")
    try:
        hf, source = layout.read_model_config(cfg.model.path)
    except layout.LayoutError as err:
        return Check("model layout", False, str(err))
    problems = layout.model_problems(cfg.parallel, hf, source)
    return Check("model layout", not problems, "; ".join(problems) or f"{source} fits the parallel layout")


def check_devices(cfg: Config, cuda_available: Optional[bool] = None) -> List[Check]:
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    needs = [name for name, on in (("sequence_parallel", cfg.parallel.sequence_parallel),
                                   ("distributed_optimizer", cfg.parallel.distributed_optimizer),
                                   ("context parallel", cfg.parallel.context > 1)) if on]
    if needs and not cuda_available:
        return [Check("devices", False, f"{', '.join(needs)} need CUDA, and none is visible")]
    return [Check("devices", True, "cuda" if cuda_available else "cpu (gloo)")]


def check_health(name: str, url: str, timeout_s: float = 5.0,
                 get: Optional[Callable[[str, float], int]] = None) -> Check:
    """``GET {url}/health`` must answer 2xx within ``timeout_s``."""
    target = url.rstrip("/") + "/health"
    if get is None:
        import httpx

        def get(u: str, t: float) -> int:
            return httpx.get(u, timeout=t).status_code

    try:
        status = get(target, timeout_s)
    except Exception as err:  # connection refused, DNS, timeout: all mean "not reachable"
        return Check(name, False, f"{target} not reachable within {timeout_s:g}s ({type(err).__name__}: {err})")
    return Check(name, 200 <= status < 300, f"{target} answered HTTP {status}")


def run_preflight(cfg: Config, *, check_sandbox: Optional[bool] = None, timeout_s: float = 5.0) -> List[Check]:
    """All checks for ``cfg``; the sandbox is checked when the agent uses tools (or when asked)."""
    checks = check_imports() + check_launch_env(cfg) + [check_model_layout(cfg)] + check_devices(cfg)
    for i, url in enumerate(cfg.rollout.urls):
        checks.append(check_health(f"rollout server {i}", url, timeout_s))
    if check_sandbox is None:
        check_sandbox = cfg.rollout.agent in ("spo_code", "hermes")
    if check_sandbox:
        checks.append(check_health("sandbox", cfg.rollout.sandbox_url, timeout_s))
    return checks


def _main(args) -> int:
    from megatron_spo.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"[FAIL] config: {err}")
        return 2
    checks = run_preflight(cfg, check_sandbox=True if args.sandbox else None, timeout_s=args.timeout)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    print(f"preflight: {len(checks) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def register(subparsers) -> None:
    from megatron_spo.config.cli import add_config_arguments

    parser = subparsers.add_parser(
        "preflight", help="check imports, ranks, parallel layout and server reachability before a run")
    add_config_arguments(parser)
    parser.add_argument("--sandbox", action="store_true", help="also check the sandbox even without a tool agent")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each /health (default 5)")
    parser.set_defaults(func=_main)
