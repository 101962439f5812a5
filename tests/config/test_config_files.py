"""Config files: a key or section written twice is an error naming the key and file:line."""

from __future__ import annotations

import pytest

from megatron_spo.config import ConfigError, load_config


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("train:\n  steps: 3\n  seed: 2\n  steps: 4\n", "train.steps", 4, 2),
        ("train:\n  steps: 3\nio:\n  log_every: 2\ntrain:\n  seed: 5\n", "train", 5, 1),
        ("algo:\n  spo:\n    rho_min: 0.8\n    rho_min: 0.9\n", "algo.spo.rho_min", 4, 3),
        ("algo: {loss: {name: ppo, name: gspo}}\n", "algo.loss.name", 1, 1),
        ("data:\n  eval_paths: [{a: 1, a: 2}]\n", "data.eval_paths[0].a", 2, 2),
    ],
)
def test_a_key_written_twice_names_the_key_and_the_line(tmp_path, text, key, line, first):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message == (f"{path}:{line}: config key {key!r} is written twice in this file "
                       f"(first at line {first}); keep one")
    assert "\n" not in message


def test_anchors_aliases_and_merge_keys_still_load(tmp_path):
    """A reused anchor or a ``<<`` merge is not a key written twice."""
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  eval_top_p: &p 0.9\n  top_p: *p\n"
                    "algo:\n  loss:\n    <<: {clip_low: 0.1, clip_high: 0.3}\n    clip_high: 0.2\n")
    cfg = load_config(path)
    assert cfg.rollout.top_p == cfg.rollout.eval_top_p == 0.9
    assert (cfg.algo.loss.clip_low, cfg.algo.loss.clip_high) == (0.1, 0.2)
