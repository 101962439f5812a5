"""Embedded engine: exact log-probs, sampling filters, stop conditions, weight updates, pause/abort."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from megatron_spo.models.tiny import make_tiny_model_dir
from megatron_spo.rollout.embedded.engine import EmbeddedEngine
from megatron_spo.rollout.engine import Engine, RequestError, SamplingParams
from megatron_spo.rollout.sampling import truncate
from megatron_spo.rollout.weight_formats import load_hf_state


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    return (str(make_tiny_model_dir(root / "a", "qwen3", seed=0)),
            str(make_tiny_model_dir(root / "b", "qwen3", seed=1)))


@pytest.fixture()
def engine(model_dirs):
    eng = EmbeddedEngine(model_dirs[0], seed=0)
    yield eng
    eng.close()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def teacher_forced(model, prompt, tokens, temperature):
    """log_softmax(logits / T) of each generated token from one unpadded full-sequence forward."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(seq).logits[0].double()
    t = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits / t, dim=-1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1), logits[len(prompt) - 1:-1]


def test_satisfies_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.health() and engine.weight_version == 0


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.9, 50), (1.3, 1.0, 5)])
def test_logprobs_equal_teacher_forced_forward(engine, temperature, top_p, top_k):
    sp = SamplingParams(max_new_tokens=24, temperature=temperature, top_p=top_p, top_k=top_k)
    results = engine.generate(PROMPTS, sp)
    worst = 0.0
    for prompt, res in zip(PROMPTS, results):
        assert res.prompt_len == len(prompt)
        if res.finish_reason == "stop":  # a row that hit eos leaves the batch early
            assert res.token_ids[-1] in engine.eos_ids and res.meta["matched"] == res.token_ids[-1]
        else:
            assert res.finish_reason == "length" and len(res.token_ids) == 24
        ref, logits = teacher_forced(engine.model, prompt, res.token_ids, temperature)
        worst = max(worst, (ref - torch.tensor(res.logprobs, dtype=torch.float64)).abs().max().item())
        if top_k > 0:  # every sampled token lies in the top-k of its step
            ranks = (logits > logits.gather(-1, torch.tensor(res.token_ids)[:, None])).sum(-1)
            assert int(ranks.max()) < top_k
    assert worst <= 1e-5, worst


def test_concurrent_agenerate_batches_mixed_settings_exactly(engine):
    """Requests with different lengths/temperatures share batches (rows drop out as they finish)."""
    calls = []
    orig = engine._run_batch
    engine._run_batch = lambda reqs: calls.append(len(reqs)) or orig(reqs)
    settings = [SamplingParams(max_new_tokens=n, temperature=t, ignore_eos=True) for n, t in
                [(3, 1.0), (17, 0.8), (9, 1.2), (30, 1.0), (1, 0.5), (12, 1.0)]]
    prompts = [[20 + i] * (i + 1) for i in range(len(settings))]

    async def run():
        return await asyncio.gather(*[engine.agenerate(p, s, request_id=f"r{i}")
                                      for i, (p, s) in enumerate(zip(prompts, settings))])

    results = asyncio.run(run())
    assert sum(calls) == len(settings) and len(calls) < len(settings)
    for i, (p, s, res) in enumerate(zip(prompts, settings, results)):
        assert res.meta["request_id"] == f"r{i}" and len(res.token_ids) == s.max_new_tokens
        ref, _ = teacher_forced(engine.model, p, res.token_ids, s.temperature)
        assert (ref - torch.tensor(res.logprobs, dtype=torch.float64)).abs().max().item() <= 1e-5


def test_greedy_and_top_k_1_follow_argmax(engine):
    for sp in (SamplingParams(max_new_tokens=10, temperature=0.0), SamplingParams(max_new_tokens=10, top_k=1),
               SamplingParams(max_new_tokens=10, top_p=1e-6)):
        res = engine.generate(PROMPTS[:2], sp)
        for prompt, r in zip(PROMPTS[:2], res):
            _, logits = teacher_forced(engine.model, prompt, r.token_ids, 1.0)
            assert r.token_ids == logits.argmax(-1).tolist()


def test_truncate_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 12))
    lp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    top_k = torch.tensor([3, -1, 5])
    top_p = torch.tensor([1.0, 0.6, 0.5], dtype=torch.float64)
    out = truncate(lp, top_k, top_p).numpy()
    for i in range(3):
        p = np.exp(lp[i].numpy())
        order = np.argsort(-p)
        keep = np.zeros(12, bool)
        mass = 0.0
        for rank, tok in enumerate(order):
            if (top_k[i] > 0 and rank >= top_k[i]) or (rank > 0 and mass >= top_p[i]):
                break
            keep[tok] = True
            mass += p[tok]
        assert np.array_equal(np.isfinite(out[i]), keep), i


def test_gumbel_sampling_frequencies_match_truncated_distribution():
    from megatron_spo.rollout.sampling import sample

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    temp = torch.full((20000,), 0.8)
    top_k = torch.full((20000,), 4, dtype=torch.long)
    top_p = torch.ones(20000)
    tok, lp = sample(logits, temp, top_k, top_p, torch.Generator().manual_seed(0), [None] * 20000)
    p = np.exp(np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]) / 0.8)
    full = p / p.sum()
    trunc = np.where(np.arange(6) < 4, p, 0.0) / p[:4].sum()
    freq = np.bincount(tok.numpy(), minlength=6) / 20000
    assert np.abs(freq - trunc).max() < 0.015, (freq, trunc)
    assert np.allclose(lp.numpy(), np.log(full[tok.numpy()]), atol=1e-5)  # untruncated log-prob recorded


def test_seeded_requests_reproduce_whatever_they_are_batched_with(engine):
    sp = SamplingParams(max_new_tokens=15, seed=1234)
    alone = engine.generate([PROMPTS[0]], sp)[0]
    batched = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], sp)[1]
    assert alone.token_ids == batched.token_ids
    other = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=15, seed=99))[0]
    assert other.token_ids != alone.token_ids


def test_stop_string_ends_at_first_completion_and_is_kept(engine):
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0.0))[0].token_ids
    tok = engine.tokenizer
    texts = [tok.decode(greedy[:k + 1]) for k in range(len(greedy))]
    # a 2-3 character stop string that first appears at some step k >= 3
    stop, first = None, None
    for k in range(3, len(greedy)):
        cand = texts[k][-3:].strip() or None
        if cand and cand not in texts[k - 1]:
            stop, first = cand, k
            break
    assert stop is not None
    first = next(k for k in range(len(greedy)) if stop in texts[k])
    res = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=40, temperature=0.0, stop=(stop,)))[0]
    assert res.finish_reason == "stop" and res.meta["matched"] == stop
    assert res.token_ids == greedy[:first + 1]


def test_stop_string_never_met_and_stop_token_and_eos(engine):
    sp = SamplingParams(max_new_tokens=25, temperature=0.0, stop=("\u2603 never \u2603",))
    res = engine.generate([PROMPTS[1]], sp)[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 25
    greedy = res.token_ids
    stop_tok = greedy[6]
    res = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=25, temperature=0.0,
                                                        stop_token_ids=(stop_tok,)))[0]
    assert res.finish_reason == "stop" and res.meta["matched"] == stop_tok
    assert res.token_ids == greedy[:greedy.index(stop_tok) + 1]
    assert engine.eos_ids == {engine.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    engine.eos_ids = frozenset({stop_tok})
    assert engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=25, temperature=0.0))[0].token_ids == \
        greedy[:greedy.index(stop_tok) + 1]
    ignored = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=25, temperature=0.0, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and ignored.token_ids == greedy


def test_bad_prompts_raise_request_errors_naming_the_item(engine):
    ctx = engine.max_context
    with pytest.raises(RequestError, match=r"prompt 1: prompt has 256 tokens, the context window is 256"):
        engine.generate([[1, 2], [3] * ctx], SamplingParams(max_new_tokens=4))
    with pytest.raises(RequestError, match=r"prompt 0: token 1 = 99999"):
        engine.generate([[1, 99999]], SamplingParams(max_new_tokens=4))
    with pytest.raises(RequestError, match="empty prompt"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(RequestError, match="top_p"):
        engine.generate([[1]], SamplingParams(top_p=0.0))
    # a prompt that fits but leaves less room than max_new_tokens: clipped at the context, "length"
    res = engine.generate([[3] * (ctx - 5)], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 5 and res.meta["context_truncated"]


def test_weight_update_from_buckets_and_disk_changes_logprobs_to_new_model(engine, model_dirs):
    from transformers import AutoModelForCausalLM

    new_model = AutoModelForCausalLM.from_pretrained(model_dirs[1], dtype=torch.float32).eval()
    state = load_hf_state(model_dirs[1])
    names = sorted(state)
    buckets = [[(n, state[n]) for n in names[i:i + 7]] for i in range(0, len(names), 7)]
    assert engine.update_weights(iter(buckets), version=3) == len(names)
    sp = SamplingParams(max_new_tokens=20, temperature=0.9)
    for prompt, res in zip(PROMPTS, engine.generate(PROMPTS, sp)):
        assert res.weight_version == 3
        ref, _ = teacher_forced(new_model, prompt, res.token_ids, 0.9)
        assert (ref - torch.tensor(res.logprobs, dtype=torch.float64)).abs().max().item() <= 1e-5
    # back to the first model from disk
    engine.update_weights(model_dirs[0], version=4)
    old_model = AutoModelForCausalLM.from_pretrained(model_dirs[0], dtype=torch.float32).eval()
    res = engine.generate([PROMPTS[0]], sp)[0]
    ref, _ = teacher_forced(old_model, PROMPTS[0], res.token_ids, 0.9)
    assert res.weight_version == 4 and (ref - torch.tensor(res.logprobs, dtype=torch.float64)).abs().max() <= 1e-5


def test_weight_update_rejects_unknown_names_and_shapes(engine):
    with pytest.raises(ValueError, match=r"bucket 0: unknown parameter 'model.nope.weight'"):
        engine.update_weights([[("model.nope.weight", torch.zeros(2))]], version=1)
    with pytest.raises(ValueError, match=r"bucket 1: 'model.norm.weight' has shape \(3,\), model expects \(64,\)"):
        engine.update_weights([[], [("model.norm.weight", torch.zeros(3))]], version=1)
    assert engine.weight_version == 0


def test_pause_aborts_in_flight_and_holds_new_requests_until_resume(engine):
    sp = SamplingParams(max_new_tokens=250, ignore_eos=True)
    fut = engine.submit(engine.make_request([7] * 4, sp, "long"))
    t0 = time.monotonic()
    while engine.tokens_generated < 3 and time.monotonic() - t0 < 30:
        time.sleep(0.002)
    engine.pause()
    res = fut.result(timeout=30)
    assert res.finish_reason == "abort" and 0 < len(res.token_ids) < 250
    assert len(res.logprobs) == len(res.token_ids)
    held = engine.submit(engine.make_request([8, 9], SamplingParams(max_new_tokens=3), "held"))
    time.sleep(0.2)
    assert not held.done()
    engine.update_weights([], version=7)
    engine.resume()
    out = held.result(timeout=30)
    assert out.finish_reason == "length" and out.weight_version == 7


def test_abort_one_request_by_id(engine):
    sp = SamplingParams(max_new_tokens=250, ignore_eos=True)
    a = engine.submit(engine.make_request([7] * 4, sp, "a"))
    b = engine.submit(engine.make_request([9] * 3, sp, "b"))
    t0 = time.monotonic()
    while engine.tokens_generated < 2 and time.monotonic() - t0 < 30:
        time.sleep(0.002)
    assert engine.abort("a") == 1
    assert a.result(timeout=30).finish_reason == "abort"
    assert b.result(timeout=30).finish_reason == "length" and len(b.result().token_ids) == 250


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_other_families_exact_logprobs_and_tied_weight_update(tmp_path, family):
    """Llama (tied embeddings) and Qwen3-MoE: exact log-probs before and after a weight update."""
    from transformers import AutoModelForCausalLM

    a = str(make_tiny_model_dir(tmp_path / "a", family, seed=0))
    b = str(make_tiny_model_dir(tmp_path / "b", family, seed=1))
    eng = EmbeddedEngine(a)
    sp = SamplingParams(max_new_tokens=12, temperature=0.8, ignore_eos=True)
    for version, ref_dir in ((0, a), (1, b)):
        if version:
            eng.update_weights([list(load_hf_state(b).items())], version)
        ref_model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
        for prompt, res in zip(PROMPTS, eng.generate(PROMPTS, sp)):
            ref, _ = teacher_forced(ref_model, prompt, res.token_ids, 0.8)
            assert res.weight_version == version
            assert (ref - torch.tensor(res.logprobs, dtype=torch.float64)).abs().max().item() <= 1e-5
    if family == "llama":  # tied: the checkpoint has no lm_head, the engine's head follows the embedding
        assert "lm_head.weight" not in load_hf_state(b)
        assert torch.equal(eng.model.lm_head.weight, load_hf_state(b)["model.embed_tokens.weight"])
    eng.close()


def test_static_and_dynamic_kv_caches_sample_the_same(model_dirs):
    """Same seed, rows finishing at different steps (compaction): identical tokens and log-probs."""
    out = {}
    for kind in ("static", "dynamic"):
        eng = EmbeddedEngine(model_dirs[0], cache=kind)
        out[kind] = eng.generate(PROMPTS, SamplingParams(max_new_tokens=30, seed=5, stop_token_ids=(40, 41, 42)))
        eng.close()
    for s, d in zip(out["static"], out["dynamic"]):
        assert s.token_ids == d.token_ids and s.finish_reason == d.finish_reason
        assert max(abs(a - b) for a, b in zip(s.logprobs, d.logprobs)) <= 1e-5
