"""SFT cold start: transcripts are token-exact protocol text, retrieve blocks and the prompt get exactly zero
gradient, model tokens and the end token are trained; text model and VLM."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import mcq_rows, train_config


def _trainer(model_dir, index, tmp_path, dataset):
    from medrwr.rollout.backends.hf import load_hf_policy
    from medrwr.train.sft import build_sft_trainer

    cfg = train_config(model_dir, index, "train.stage=0", "train.max_steps=1")
    backend = load_hf_policy(model_dir, temperature=1.0)
    trainer, _ = build_sft_trainer(cfg, dataset, tmp_path / "sft", backend=backend)
    return trainer, backend


def _final_norm(model):
    inner = model.model
    return getattr(inner, "language_model", inner).norm


def _check_gradients(trainer, backend):
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    text = backend.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert "<query>" in text and "<retrieve>" in text and text.rstrip().endswith("</answer><|im_end|>")
    trained = labels[:, 1:] != -100  # position p predicts token p + 1
    ids = batch["input_ids"][:, 1:]
    end = backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained[ids == end].any(), "the end token must be trained"
    retrieve_ids = set(backend.tokenizer.encode("<retrieve>", add_special_tokens=False))
    assert not trained[torch.isin(ids, torch.tensor(sorted(retrieve_ids)))].all()
    captured = {}

    def keep(_m, _i, out):
        out.retain_grad()
        captured["h"] = out

    model = trainer.model
    model.train()
    handle = _final_norm(model).register_forward_hook(keep)
    try:
        out = model(**{k: v for k, v in batch.items()})
        out.loss.backward()
    finally:
        handle.remove()
    per_pos = captured["h"].grad[:, :-1].abs().sum(-1)
    assert torch.all(per_pos[~trained] == 0), "a prompt or retrieve token received gradient"
    assert torch.all(per_pos[trained] > 0), "a model-written token received no gradient"
    # the inserted block is really masked (not just the prompt): some untrained positions sit after trained ones
    first_trained = trained.float().argmax(dim=1)
    after = torch.arange(trained.shape[1])[None, :] > first_trained[:, None]
    assert (after & ~trained & (batch["attention_mask"][:, 1:] == 1)).sum() > 20


def test_sft_masks_retrieved_tokens_text(tiny_lm_dir, bm25_index, tmp_path):
    trainer, backend = _trainer(tiny_lm_dir, bm25_index, tmp_path, mcq_rows(n=2))
    assert trainer.args.completion_only_loss is True
    _check_gradients(trainer, backend)


@pytest.mark.slow
def test_sft_masks_retrieved_tokens_vlm(tiny_vlm_dir, bm25_index, tmp_path):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.radial_gradient("L").convert("RGB").resize((64, 48)).save(img)
    trainer, backend = _trainer(tiny_vlm_dir, bm25_index, tmp_path, mcq_rows(n=2, images=str(img)))
    _check_gradients(trainer, backend)
