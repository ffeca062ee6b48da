"""The GRPO loss is right: inserted tokens get exactly zero gradient, model tokens do not, and TRL's training
forward reproduces the rollout's log-probs (text model and VLM with an image)."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import mcq_rows, scripted_backend, train_config


def _build(model_dir, index, dataset, tmp_path, *extra):
    from medrwr.train.grpo import build_grpo_trainer

    cfg = train_config(model_dir, index, "train.beta=0.001", *extra)
    backend = scripted_backend(model_dir)
    return build_grpo_trainer(cfg, dataset, tmp_path / "out", backend=backend)


def _batch(trainer, dataset):
    rows = [dataset[0]] * trainer.num_generations  # one group, as TRL's sampler repeats a prompt
    trainer.model.train()
    return trainer._generate_and_score_completions(rows)


def _final_norm(model):
    inner = model.model
    return getattr(inner, "language_model", inner).norm


@pytest.fixture(scope="module", params=["plain", "fused"])
def text_run(request, tiny_lm_dir, bm25_index, tmp_path_factory):
    """One scripted GRPO batch, with our plain log-prob head (the CPU default) and with TRL's fused head."""
    ds = mcq_rows()
    trainer, rollout = _build(tiny_lm_dir, bm25_index, ds, tmp_path_factory.mktemp("grpo"),
                              f"train.logprob_head={request.param}")
    return trainer, rollout, _batch(trainer, ds)


def test_inserted_tokens_get_zero_gradient(text_run):
    trainer, rollout, batch = text_run
    mask = batch["tool_mask"] * batch["completion_mask"]
    assert (batch["tool_mask"] == 0).sum() > 20, "the scripted query must have inserted a retrieve block"
    assert all(t.rounds == 1 for t in rollout.last["traces"])
    batch["advantages"] = torch.ones_like(batch["advantages"])  # every model token carries loss
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; we call compute_loss directly
    captured = {}

    def keep(_module, _inp, out):
        out.retain_grad()
        captured["h"] = out

    handle = _final_norm(trainer.model).register_forward_hook(keep)
    try:
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    finally:
        handle.remove()
    grad = captured["h"].grad  # (B, P + C, hidden): position P+i-1 predicts completion token i
    p = batch["prompt_ids"].shape[1]
    c = batch["completion_ids"].shape[1]
    per_token = grad[:, p - 1 : p - 1 + c].abs().sum(-1)
    assert torch.all(per_token[mask == 0] == 0), "a retrieve (mask 0) token received gradient"
    assert torch.all(per_token[mask == 1] > 0), "a model-written token received no gradient"


def _model_logprobs(rollout):
    """The rollout's log-probs of model tokens, per row (the appended end token has no sampled log-prob)."""
    out = []
    for lps, mask in zip(rollout.last["logprobs"], rollout.last["env_mask"]):
        out.append([(i, lp) for i, (lp, m) in enumerate(zip(lps, mask)) if m == 1 and lp is not None])
    return out


def _assert_logprobs_match(batch, rollout):
    ref = batch["ref_per_token_logps"]
    worst = 0.0
    n = 0
    for b, pairs in enumerate(_model_logprobs(rollout)):
        for i, lp in pairs:
            worst = max(worst, abs(float(ref[b, i]) - lp))
            n += 1
    assert n > 40
    assert worst < 1e-4, f"training forward log-probs differ from the rollout's by {worst:.2e}"


def test_plain_head_does_not_score_inserted_tokens(text_run):
    """The plain head skips retrieved tokens (their log-prob is exactly 0, no LM-head work); TRL's fused head
    scores them (non-zero), which is why the plain head is cheaper when retrieval inserts many tokens."""
    trainer, rollout, batch = text_run
    ref = batch["ref_per_token_logps"]
    inserted = (batch["tool_mask"] == 0) & (batch["completion_mask"] == 1)
    model = (batch["tool_mask"] == 1) & (batch["completion_mask"] == 1)
    assert inserted.sum() > 20 and torch.all(ref[model] != 0)
    if rollout.masks is not None:  # plain head
        assert torch.all(ref[inserted] == 0)
    else:
        assert torch.all(ref[inserted] != 0)


def test_training_logprobs_equal_rollout_text(text_run):
    _trainer, rollout, batch = text_run
    _assert_logprobs_match(batch, rollout)


def test_training_logprobs_equal_rollout_vlm_with_image(tiny_vlm_dir, bm25_index, tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.radial_gradient("L").convert("RGB").resize((64, 48)).save(img)
    ds = mcq_rows(images=str(img))
    assert "images" in ds.column_names
    trainer, rollout = _build(tiny_vlm_dir, bm25_index, ds, tmp_path)
    batch = _batch(trainer, ds)
    assert "pixel_values" in batch and "mm_token_type_ids" in batch
    assert all(t.rounds == 1 for t in rollout.last["traces"])
    _assert_logprobs_match(batch, rollout)


def test_trl_passes_prompts_repeated_per_group(tiny_lm_dir, bm25_index, tmp_path):
    """TRL 1.16 hands rollout_func each prompt already repeated num_generations times, consecutively (its
    docstring says otherwise): one completion per entry is what we return."""
    ds = mcq_rows(n=4)
    trainer, rollout = _build(tiny_lm_dir, bm25_index, ds, tmp_path, "train.num_generations=2",
                              "train.per_device_batch_size=4")
    seen = []
    run = rollout.engine.rollout_batch
    rollout.engine.rollout_batch = lambda prompts: seen.append(prompts) or run(prompts)
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    (prompts,) = seen
    users = [p[-1]["content"] for p in prompts]
    assert len(users) == 4 and users[0] == users[1] and users[2] == users[3] and users[0] != users[2]
