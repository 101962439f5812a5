"""Peak memory and time: chunked vocab-parallel log-probs vs a naive ``log_softmax`` (vocab 151,936).

Both sides start from the same final hidden states [T, H] and output weight [V, H] (hidden size
reduced so it runs on a CPU in a couple of minutes; memory is dominated by T x V anyway) and compute
the log-prob and entropy of given target tokens:

* naive:   logits = hidden @ W.T; logsm = log_softmax(logits); gather; entropy = -(p * logsm).sum
* chunked: megatron_spo.megatron.logprobs.chunked_logprobs_from_hidden (default chunking)

Each (side, mode) runs in its own subprocess; peak = VmHWM - VmRSS measured after the inputs exist
(VmHWM is reset through /proc/self/clear_refs), so both sides are measured identically in one run.
Modes: ``score`` (no grad, T = 8192: old/ref log-probs) and ``train`` (forward + backward w.r.t.
hidden and weight; fewer tokens because the naive side would need ~4 x T x V x 4 bytes).

Usage: python bench/chunked_logprobs.py [--tokens 8192] [--train-tokens 2048] [--hidden 32]
The last line is ``ratio: <peak chunked / peak naive>`` for the 8k-token scoring case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VOCAB = 151_936


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(side: str, mode: str, tokens: int, hidden_size: int) -> dict:
    import torch

    from megatron_spo.megatron.logprobs import chunked_logprobs_from_hidden

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g) * 0.5
    weight = torch.randn(VOCAB, hidden_size, generator=g) * 0.5
    targets = torch.randint(0, VOCAB, (tokens,), generator=g)
    train = mode == "train"
    hidden.requires_grad_(train)
    weight.requires_grad_(train)

    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    with torch.set_grad_enabled(train):
        if side == "naive":
            logsm = torch.log_softmax(hidden @ weight.t(), dim=-1)
            logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            entropy = -(logsm.exp() * logsm).sum(-1)
        else:
            logp, entropy = chunked_logprobs_from_hidden(hidden, weight, targets)
        if train:
            (logp.sum() + 0.01 * entropy.sum()).backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - base
    return {"side": side, "mode": mode, "tokens": tokens, "peak_mib": peak / 1024, "seconds": seconds,
            "logp_sum": float(logp.detach().double().sum()), "entropy_sum": float(entropy.detach().double().sum())}


def _run(side: str, mode: str, tokens: int, hidden_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", side, "--mode", mode, "--tokens", str(tokens),
                          "--hidden", str(hidden_size)], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    quick = "--quick" in sys.argv[1:]  # smaller defaults; flags given explicitly still win
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run well under 3 minutes: 2048 / 512 tokens")
    ap.add_argument("--tokens", type=int, default=2048 if quick else 8192)
    ap.add_argument("--train-tokens", type=int, default=512 if quick else 2048)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--worker", choices=["naive", "chunked"])
    ap.add_argument("--mode", choices=["score", "train"], default="score")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.mode, args.tokens, args.hidden)))
        return
    rows = []
    for mode, tokens in (("train", args.train_tokens), ("score", args.tokens)):
        naive = _run("naive", mode, tokens, args.hidden)
        chunked = _run("chunked", mode, tokens, args.hidden)
        # Same numbers on both sides (a check that the benchmark compares like with like).
        rel = abs(naive["logp_sum"] - chunked["logp_sum"]) / abs(naive["logp_sum"])
        if rel > 1e-4:
            raise SystemExit(f"chunked and naive disagree: {naive['logp_sum']} vs {chunked['logp_sum']}")
        rows.append((mode, tokens, naive, chunked))
    print(f"vocab {VOCAB}, hidden {args.hidden}, fp32, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}")
    print(f"{'mode':<6} {'tokens':>6} {'naive MiB':>10} {'chunked MiB':>12} {'ratio':>6} {'naive s':>8} {'chunked s':>10}")
    for mode, tokens, naive, chunked in rows:
        print(f"{mode:<6} {tokens:>6} {naive['peak_mib']:>10.0f} {chunked['peak_mib']:>12.0f} "
              f"{chunked['peak_mib'] / naive['peak_mib']:>6.3f} {naive['seconds']:>8.2f} {chunked['seconds']:>10.2f}")
    mode, tokens, naive, chunked = rows[-1]
    print(f"ratio: {chunked['peak_mib'] / naive['peak_mib']:.4f}")


if __name__ == "__main__":
    main()
