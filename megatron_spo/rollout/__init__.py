"""Rollout side: engine protocol, embedded CPU engine, SGLang/vLLM clients, fleet, agent loop, scheduler, rewards."""
