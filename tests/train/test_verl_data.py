"""verl data and configs: our MCQ files as verl parquet (``medrwr train verl-data``), and configs/verl/*.yaml
composed over verl 0.9.1's own trainer config and checked by verl's validator."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _mcq_file(tmp_path, n=3, images=True, question="Which finding {i}?"):
    from PIL import Image

    rows = []
    for i in range(n):
        row = {"question": question.format(i=i), "options": ["fever", "rash", "cough"], "answer": "B",
               "explanation": f"because {i}"}
        if images:
            rgb = np.random.default_rng(i).integers(0, 255, (600, 700, 3), dtype=np.uint8)  # > 262,144 pixels
            Image.fromarray(rgb).save(tmp_path / f"img{i}.png")
            row["images"] = [f"img{i}.png"]
        rows.append(row)
    path = tmp_path / "mcq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_image_mcq_file_becomes_verl_rows(tmp_path):
    from PIL import Image

    from medrwr import protocol
    from medrwr.train.data import load_mcq_dataset
    from medrwr.train.verl_data import convert_to_verl

    src = _mcq_file(tmp_path)
    out = tmp_path / "verl" / "stage2.parquet"
    assert convert_to_verl(src, out) == 3
    rows = _read(out)
    trl = load_mcq_dataset(src)  # what medrwr train (TRL) reads from the same file
    assert [p.name for p in out.parent.iterdir()] == ["stage2.parquet"]  # no temporary file left behind
    for i, row in enumerate(rows):
        assert row["agent_name"] == "medrwr_agent" and row["data_source"] == "medrwr/mcq"
        system, user = row["prompt"]
        assert system == {"role": "system", "content": protocol.system_prompt(with_image=True)}
        assert user["content"] == "<image>" + trl[i]["prompt"][1]["content"]
        assert row["reward_model"] == {"style": "rule", "ground_truth": "B"}
        assert row["extra_info"] == {"index": i, "split": "train", "answer": "B",
                                     "options": ["fever", "rash", "cough"], "explanation": f"because {i}"}
        [image] = row["images"]
        got = Image.open(io.BytesIO(image["bytes"]))
        want = trl[i]["images"][0]
        assert got.size == want.size and got.width * got.height <= 262_144  # shrunk once, as for TRL
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))  # lossless: the same pixels


def test_text_file_has_no_image_column_and_names_its_format(tmp_path):
    from medrwr.train.verl_data import convert_to_verl

    src = tmp_path / "medqa.jsonl"
    src.write_text(json.dumps({"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}) + "\n")
    out = tmp_path / "s1.parquet"
    assert convert_to_verl(src, out, split="val") == 1
    [row] = _read(out)
    assert "images" not in row and row["data_source"] == "medrwr/medqa"
    assert "<image>" not in row["prompt"][1]["content"] and row["extra_info"]["split"] == "val"


def test_bad_input_is_refused_before_writing(tmp_path):
    from medrwr.errors import TrainingDataError
    from medrwr.train.verl_data import convert_to_verl

    src = _mcq_file(tmp_path, n=1, images=False, question="What does <image> show {i}?")
    with pytest.raises(TrainingDataError, match="contains '<image>', which verl reads as a media placeholder"):
        convert_to_verl(src, tmp_path / "o.parquet")
    with pytest.raises(TrainingDataError, match="name the output file \\*.parquet"):
        convert_to_verl(src, tmp_path / "o.jsonl")
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".o.parquet.tmp-*"))


def test_cli_converts_and_reports_errors_in_one_line(tmp_path, capsys):
    from medrwr.cli.app import main

    src = _mcq_file(tmp_path, n=2, images=False)
    out = tmp_path / "s1.parquet"
    assert main(["train", "verl-data", str(src), str(out), "--limit", "1", "--data-source", "medqa"]) == 0
    assert "wrote 1 verl rows" in capsys.readouterr().out
    [row] = _read(out)
    assert row["data_source"] == "medqa"
    code = main(["train", "verl-data", str(tmp_path / "missing.jsonl"), str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_repo_tests_package_is_not_shadowed():
    """verl 0.9.1's wheel installs top-level ``tests`` and ``scripts`` packages; left in site-packages they hide
    this repo's ``tests`` package (``from tests.train.conftest import ...`` breaks). Install: docs/scaling.md."""
    spec = importlib.util.find_spec("tests")
    assert spec is not None and str(ROOT / "tests") in list(spec.submodule_search_locations or [])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_verl_configs_compose_and_validate(stage, monkeypatch):
    pytest.importorskip("verl.trainer.main_ppo", reason="verl 0.9.1 is not installed (see docs/scaling.md)")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.trainer.main_ppo import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from medrwr.config import load_config
    from medrwr.train.verl import worst_case_response_length

    monkeypatch.chdir(ROOT)
    with initialize_config_dir(config_dir=str(ROOT / "configs/verl"), version_base=None):
        cfg = compose(config_name=stage, overrides=["trainer.nnodes=2"])
    with pytest.warns(UserWarning, match="Disabled critic"):
        validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert need_reference_policy(cfg) and not need_critic(cfg)  # GRPO with a KL loss to the frozen reference
    rollout = cfg.actor_rollout_ref.rollout
    assert rollout.agent.default_agent_loop == "medrwr_agent" and rollout.n == 8
    loops = OmegaConf.load(ROOT / rollout.agent.agent_loop_config_path)
    assert [(x.name, x._target_) for x in loops] == [("medrwr_agent", "medrwr.train.verl.MedRwRAgentLoop")]
    reward = OmegaConf.to_container(cfg.reward.custom_reward_function, resolve=True)
    sets = ["retrieval.url=http://127.0.0.1:8321"] + (["rewards.confidence_weight=0"] if stage == "stage2" else [])
    assert reward == {"path": "pkg://medrwr.train.verl_reward", "name": "compute_score",
                      "reward_kwargs": {"config": f"configs/{stage}.yaml", "overrides": sets}}
    if stage == "stage1":  # verl's own loader finds our function and merges reward_kwargs into each call
        from verl.trainer.ppo.reward import get_custom_reward_fn

        score = get_custom_reward_fn(cfg)(data_source="medrwr/mcq", solution_str="<think>a</think><answer>B</answer>",
                                          ground_truth="B", extra_info={})
        assert score["score"] == 6.0  # stage 1: 5 * accuracy + 1 * format (no retrieval)
    ours = load_config(cfg.medrwr.config, list(cfg.medrwr.overrides))  # the file our agent loop will load
    assert cfg.data.max_response_length >= worst_case_response_length(ours.rollout)
    assert ours.rollout.temperature == rollout.temperature == 1.0

