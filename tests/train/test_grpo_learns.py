"""GRPO learns: with only the answer letter left free and the accuracy reward alone, the mean reward rises from
chance (1/4) to >= 0.8 within a bounded number of steps, and the run writes its metrics and final model."""

from __future__ import annotations

import json

import pytest

from tests.train.conftest import mcq_rows, scripted_backend, train_config

STEPS = 12


@pytest.mark.slow
def test_grpo_learns_the_answer_letter(tiny_lm_dir, tmp_path):
    from medrwr.train.run import run_training

    cfg = train_config(
        tiny_lm_dir, None, "rollout.max_rounds=0", "train.rewards=[accuracy]", "train.num_generations=8",
        "train.per_device_batch_size=8", f"train.max_steps={STEPS}", "rewards.accuracy_weight=1.0",
        "train.learning_rate=0.01", "train.warmup_ratio=0.0", "train.beta=0.0", "train.trl={save_steps: 1000}",
    )
    backend = scripted_backend(tiny_lm_dir, letters="ABCD", query=False, seed=1)
    data = mcq_rows(n=4, answer="C", options=("fever", "rash", "cough", "pain"))
    result = run_training(cfg, tmp_path / "run", dataset=data, backend=backend)
    rows = [r for r in map(json.loads, result.metrics.read_text().splitlines()) if "reward" in r]
    rewards = [r["reward"] for r in rows]
    assert len(rows) == STEPS
    assert sum(rewards[:3]) / 3 < 0.6, f"should start near chance (0.25): {rewards[:3]}"
    assert max(sum(rewards[i : i + 3]) / 3 for i in range(len(rewards) - 2)) >= 0.8, rewards
    assert rewards[-1] >= 0.8, rewards
    assert all(abs(r["accuracy"] - r["reward"]) < 1e-6 for r in rows)  # accuracy alone, weight 1
    assert (result.checkpoint / "config.json").is_file()


@pytest.mark.slow
def test_lora_run_saves_a_merged_plain_folder(tiny_lm_dir, tmp_path):
    from medrwr.rollout.backends.hf import load_hf_policy
    from medrwr.train.run import run_training

    cfg = train_config(tiny_lm_dir, None, "rollout.max_rounds=0", "train.lora=4", "train.rewards=[accuracy]")
    backend = scripted_backend(tiny_lm_dir, letters="AB", query=False)
    result = run_training(cfg, tmp_path / "lora", dataset=mcq_rows(n=2), backend=backend)
    assert not (result.checkpoint / "adapter_config.json").exists()
    assert (result.checkpoint / "model.safetensors").is_file()
    reloaded = load_hf_policy(result.checkpoint)
    names = [n for n, _ in reloaded.model.named_parameters()]
    assert not any("lora" in n for n in names)
