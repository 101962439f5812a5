"""Helpers of the end-to-end trainer test (tests/test_train_e2e.py): the tool task, a warm-started
tiny policy that writes ``<code>`` blocks, and a reward that also logs what it graded.

The task: "What is a * b?" for small a, b, answered in the SPO ``<code>`` protocol. A random tiny
model never writes ``<code>``, so the policy gets a short supervised warm start (teacher-forced
cross-entropy over the HF model, as ``megatron_spo.demo`` does for its answer format) on the
trajectory the protocol produces for a correct solution::

    <code>\\n```python\\nprint(a * b)\\n```\\n</code>          model tokens (trained)
    <interpreter>\\n{a*b}\\n\\n</interpreter>\\n\\n           tool tokens (context only, not trained)
    \\boxed{a*b}<|im_end|>                                   model tokens (trained)

Each piece is tokenised on its own, exactly as the agent loop appends it, so the warm start sees the
token sequences the rollouts will produce. The warm start only teaches the format: at temperature 1
the policy still varies (digits, broken code), so rewards are mixed and the sandbox sees both good
and bad programs. The reward (:func:`logged_boxed_reward`) is the usual last-``\\boxed{}`` match; it
also appends one JSON line per graded sample (uid, prompt key, reward, response text, tool calls) to
the file named by ``$E2E_REWARD_LOG``, the test's record of which prompts each step sampled and
what the sandbox answered. It runs in the trainer's rank-0 process (a thread pool), hence the lock.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from pathlib import Path
from typing import List, Tuple

import torch

REWARD = "train_e2e_support:logged_boxed_reward"
LOG_ENV = "E2E_REWARD_LOG"
_lock = threading.Lock()


PHRASINGS = ("What is {a} * {b}?", "Compute {a} * {b}.", "Calculate {a} * {b}.", "Evaluate {a} * {b}.",
             "Find {a} * {b}.", "Work out {a} * {b}.", "Multiply {a} * {b}.", "Give {a} * {b}.",
             "Tell me {a} * {b}.", "Solve {a} * {b}.")


def problems() -> List[Tuple[str, str]]:
    """40 distinct prompts (10 phrasings x a in {2, 3} x b in {4, 5}) with the products as answers.

    Few distinct factors on purpose: the tiny policy copies the factors from the question only
    sometimes, so with four (a, b) pairs a right program (and reward 1) stays frequent and the
    rewards of a step are mixed (SPO's batch-normalised advantages are then non-zero).
    """
    return [(p.format(a=a, b=b), str(a * b)) for p in PHRASINGS for a in (2, 3) for b in (4, 5)]


def write_dataset(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in problems()))
    return path


def code_of(question: str) -> str:
    """The program a correct first turn runs for a question about ``a * b``: ``print(a * b)``."""
    a, b = re.search(r"(\d+) \* (\d+)", question).groups()
    return f"print({a} * {b})"


def trajectory(tok, question: str, answer: str) -> Tuple[List[int], List[int]]:
    """Token ids and labels (-100 = not trained) of the prompt plus a correct tool-using response."""
    from megatron_spo.rollout.agent_loop import render_prompt_ids, spo_user_prompt
    from megatron_spo.rollout.code_tool import interpreter_block

    prompt = render_prompt_ids(tok, [{"role": "user", "content": spo_user_prompt(question)}])
    turn1 = tok.encode(f"<code>\n```python\n{code_of(question)}\n```\n</code>", add_special_tokens=False)
    tool = tok.encode(interpreter_block(f"{answer}\n"), add_special_tokens=False)
    turn2 = tok.encode(f"\\boxed{{{answer}}}{tok.eos_token}", add_special_tokens=False)
    ids = prompt + turn1 + tool + turn2
    labels = [-100] * len(prompt) + turn1 + [-100] * len(tool) + turn2
    return ids, labels


def common_prefix_len(rows: List[List[int]]) -> int:
    """Length of the token prefix every row shares (the SPO instruction: most of each prompt)."""
    n = 0
    while all(len(r) > n and r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def warm_start(base_dir: Path, out_dir: Path, *, steps: int, lr: float, batch: int = 8, seed: int = 0) -> float:
    """Teacher-forced cross-entropy on :func:`trajectory` rows for ``steps`` AdamW steps; saves to ``out_dir``.

    The loss of a step is the mean over the batch's trained (model) tokens. The shared prompt prefix
    (~460 of ~550 tokens) runs once per step at batch 1 and its KV cache is repeated over the batch
    (gradients flow through it): the same loss and gradients as full rows, at a fifth of the cost.
    Returns the last step's loss.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows = [trajectory(tok, q, a) for q, a in problems()]
    p = common_prefix_len([ids for ids, _ in rows])
    prefix = torch.tensor([rows[0][0][:p]])
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        picked = rng.sample(rows, batch)
        width = max(len(ids) for ids, _ in picked) - p
        ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        attn = torch.zeros((batch, p + width), dtype=torch.long)
        for i, (seq, lab) in enumerate(picked):
            ids[i, : len(seq) - p] = torch.tensor(seq[p:])
            labels[i, : len(seq) - p] = torch.tensor(lab[p:])
            attn[i, : len(seq)] = 1
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(batch)
        positions = (p + torch.arange(width)).expand(batch, -1)
        logits = model(input_ids=ids, attention_mask=attn, past_key_values=cache, position_ids=positions).logits
        # Position t predicts token t + 1; the prefix's last position would predict ids[:, 0], a
        # prompt token (label -100), so nothing trained is lost by starting inside the suffix.
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return float(loss.detach())


def logged_boxed_reward(response: str, ground_truth, **info) -> float:
    """1.0 if the last ``\\boxed{...}`` of ``response`` equals ``ground_truth``, else 0.0; logs the sample."""
    from megatron_spo.demo import boxed_match

    score = boxed_match(response, ground_truth)
    path = os.environ.get(LOG_ENV)
    sample = info.get("sample")
    if path and sample is not None:
        line = json.dumps({"uid": sample.uid, "key": sample.key, "reward": score, "response": response,
                           "tool_calls": int(sample.metrics.get("tool_calls", 0)),
                           "tool_errors": int(sample.metrics.get("tool_errors", 0))})
        with _lock, open(path, "a") as f:
            f.write(line + "\n")
    return score
