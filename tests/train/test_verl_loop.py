"""The verl agent loop (medrwr.train.verl) on CPU: verl 0.9.1's real ``AgentLoopBase``, ``RLHFDataset`` and
registry; only verl's server client (vLLM on a GPU) is stood in, by an object with the same ``generate``
signature that runs the tiny model. Parity: one forced transcript gives the same prompt ids, response ids, mask
and images through TRL's ``rollout_func`` path and through verl's agent loop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.train.conftest import mcq_rows, train_config


@pytest.fixture(autouse=True, scope="module")
def _verl():
    """verl is imported when these tests run, not at collection: it imports Ray, which reads its settings once
    per process (the Ray Serve shard test sets its own for a local cluster)."""
    pytest.importorskip("verl.experimental.agent_loop", reason="verl 0.9.1 is not installed (see docs/scaling.md)")

SCRIPT = ["<think>need facts</think><query>pneumonia fever</query>", "<think>read them</think><answer>A</answer>"]
VERL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


class TinyServerClient:
    """Stands in for verl's ``LLMServerClient``: same ``generate`` keywords, returns verl's ``TokenOutput``;
    generates with a tiny transformers model (our HF backend) that keeps stop strings, as vLLM does."""

    def __init__(self, backend):
        self.backend = backend
        self.requests = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        from medrwr.rollout.backends.base import GenerationState

        self.requests.append({"request_id": request_id, "prompt_ids": list(prompt_ids),
                              "sampling_params": dict(sampling_params), "images": list(image_data or [])})
        mm = None
        for image in image_data or []:
            _, one = self.backend.encode_image(image)
            mm = one if mm is None else mm.extended(one)
        [cont] = self.backend.generate([GenerationState(list(prompt_ids), mm, request_id)],
                                       sampling_params["stop"], sampling_params["max_tokens"])
        return TokenOutput(token_ids=cont.token_ids, stop_reason="completed",
                           log_probs=cont.logprobs if sampling_params.get("logprobs") else None)


def _forced(model_dir):
    from medrwr.rollout.backends.hf import load_hf_policy
    from medrwr.testing import ForcedTranscript

    backend = load_hf_policy(model_dir, temperature=1.0, seed=0)
    backend.logits_processors = [ForcedTranscript(backend.tokenizer, SCRIPT)]
    return backend


@pytest.fixture(scope="module")
def retrieval_url(bm25_index, loopback_server):
    """One retrieval server on loopback, shared by both paths (as verl's rollout workers share one)."""
    from medrwr.config import load_config
    from medrwr.retrieval.open import open_retriever
    from medrwr.retrieval.service.app import create_app

    retriever = open_retriever(load_config(None, [f"retrieval.index={bm25_index}", "retrieval.mode=bm25"]))
    with loopback_server(create_app(retriever)) as server:
        yield server.url


def _agent(proc, cfg_sets, server, response_length=512):
    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry
    from verl.utils.dataset.rl_dataset import RLHFDataset

    import medrwr.train.verl as mv

    mv._resources.cache_clear()
    processor = proc if getattr(proc, "image_processor", None) is not None else None
    trainer = OmegaConf.create({
        "actor_rollout_ref": {"rollout": {"name": "vllm", "prompt_length": 2048, "response_length": response_length}},
        "data": {}, "medrwr": {"config": None, "overrides": list(cfg_sets)},
    })
    assert mv.MedRwRAgentLoop  # the attribute access registers the loop, as hydra's _target_ lookup does
    return hydra.utils.instantiate(  # exactly as verl's AgentLoopWorker._run_agent_loop builds a loop
        config=_agent_loop_registry["medrwr_agent"], trainer_config=DictConfigWrap(trainer), server_manager=server,
        tokenizer=getattr(proc, "tokenizer", proc), processor=processor, hf_model_type=None,
        dataset_cls=RLHFDataset, data_config=DictConfigWrap(trainer.data), tools=ToolListWrap([]),
    )


def _verl_row(dataset, tmp_path, processor, tokenizer, monkeypatch):
    """Row 0 of our converter's parquet as verl's own RLHFDataset hands it to an agent loop."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from medrwr.train.verl_data import verl_rows

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows(dataset)), path)
    ds = RLHFDataset([str(path)], tokenizer, OmegaConf.create({"filter_overlong_prompts": False}), processor)
    row = ds[0]
    assert row.pop("agent_name") == "medrwr_agent"  # verl's worker pops it to pick the loop
    return row


@pytest.fixture(scope="module", params=["image", "text"])
def both_paths(request, tiny_vlm_dir, tiny_lm_dir, retrieval_url, tmp_path_factory):
    """The same forced transcript through TRL's rollout_func and through the verl agent loop."""
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    from medrwr.rollout.engine import engine_from_config
    from medrwr.train.grpo import TrainRollout

    tmp = tmp_path_factory.mktemp("verl")
    image = request.param == "image"
    model_dir = tiny_vlm_dir if image else tiny_lm_dir
    sets = ["model.threads=1", "rollout.temperature=1.0", "rollout.max_new_tokens_per_turn=32",
            "rollout.max_total_new_tokens=64", "rollout.max_inserted_tokens=48", "rollout.max_rounds=1",
            "rewards.query_weight=0", "rewards.confidence_weight=0", "retrieval.k=2", f"retrieval.url={retrieval_url}"]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)) if image else None
    dataset = mcq_rows(1, images=img)

    # TRL path: what GRPOTrainer hands rollout_func (prepare_multimodal_messages), our TrainRollout on HF
    trl_backend = _forced(model_dir)
    engine = engine_from_config(train_config(model_dir, None, *sets), backend=trl_backend)
    eos = trl_backend.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ex = dataset[0]
    prompt = prepare_multimodal_messages(ex["prompt"], images=ex["images"]) if image else ex["prompt"]
    trl_out = TrainRollout(engine, eos)([prompt])

    # verl path: converter parquet -> verl's RLHFDataset -> our registered agent loop -> stand-in server
    server = TinyServerClient(_forced(model_dir))
    agent = _agent(server.backend.processor, sets, server)
    with pytest.MonkeyPatch.context() as mp:
        row = _verl_row(dataset, tmp, agent.processor, agent.tokenizer, mp)
    verl_out = asyncio.run(agent.run(dict(VERL_SAMPLING), **row))
    return {"trl": trl_out, "verl": verl_out, "server": server, "dataset": dataset, "image": image, "row": row}


def test_parity_trl_and_verl(both_paths):
    trl, verl = both_paths["trl"], both_paths["verl"]
    assert verl.prompt_ids == trl["prompt_ids"][0]
    assert verl.response_ids == trl["completion_ids"][0]
    assert verl.response_mask == trl["env_mask"][0]
    assert 0 in verl.response_mask and verl.response_mask[-1] == 1  # a retrieve block, then the end token
    expected_lp = [0.0 if x is None else x for x in trl["logprobs"][0]]
    assert verl.response_logprobs == pytest.approx(expected_lp, abs=1e-4)
    if both_paths["image"]:
        [got] = verl.multi_modal_data["images"]
        [want] = both_paths["dataset"][0]["images"]
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want))
    else:
        assert verl.multi_modal_data == {}


def test_loop_runs_our_protocol_through_the_server(both_paths):
    verl, server = both_paths["verl"], both_paths["server"]
    assert len(server.requests) == 2  # one generate call per model turn
    first, second = server.requests
    assert first["sampling_params"] == {**VERL_SAMPLING, "stop": ["</query>", "</answer>"],
                                        "include_stop_str_in_output": True, "max_tokens": 32}
    assert first["request_id"] == second["request_id"]  # sticky session: the server's prefix cache is reused
    n_prompt = len(verl.prompt_ids)
    assert second["prompt_ids"][:n_prompt] == verl.prompt_ids
    assert second["prompt_ids"][n_prompt:] == verl.response_ids[: len(second["prompt_ids"]) - n_prompt]
    assert len(first["images"]) == len(second["images"]) == (1 if both_paths["image"] else 0)
    trace = verl.extra_fields["medrwr_trace"]
    assert trace["rounds"] == 1 and trace["answer"] == "A" and trace["stop_reason"] == "answer"
    assert trace["retrievals"][0]["hits"][0][0]["text"].startswith("Pneumonia causes fever")
    assert verl.num_turns == 4  # the prompt, two model turns, one retrieve block
    assert verl.extra_fields["turn_scores"] == [] and verl.extra_fields["tool_rewards"] == []


def test_reward_adapter_scores_the_loop_output(both_paths):
    from medrwr.train.verl_reward import compute_score

    verl, row = both_paths["verl"], both_paths["row"]
    extra_info = {**row["extra_info"], **verl.extra_fields, "num_turns": verl.num_turns}  # as verl's reward manager
    out = compute_score(row["data_source"], "ignored: the trace wins", row["reward_model"]["ground_truth"],
                        extra_info, overrides=["rewards.query_weight=0", "rewards.confidence_weight=0"])
    assert out["accuracy"] == 1.0 and out["format"] == 2.0  # right answer after a retrieval
    assert out["score"] == 5.0 * 1.0 + 1.0 * 2.0
    assert out["retrieval_rounds"] == 1.0 and out["answered"] == 1.0


def test_output_goes_through_verls_postprocessing(both_paths, tiny_vlm_dir):
    """verl's own padding / multimodal inputs / position ids accept the loop's output."""
    import types

    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    verl = both_paths["verl"]
    server = both_paths["server"]
    proc = server.backend.processor
    worker = types.SimpleNamespace(
        rollout_config=types.SimpleNamespace(prompt_length=2048, response_length=512),
        tokenizer=getattr(proc, "tokenizer", proc), reward_loop_worker_handles=None, distillation_enabled=False,
        processor=proc if both_paths["image"] else None, mm_processor_kwargs={},
    )
    for name in ("_pad_token_ids", "_compute_multi_modal_inputs", "_compute_position_ids", "_compute_score",
                 "_compute_teacher_logprobs", "_get_mm_processor_kwargs"):
        setattr(worker, name, types.MethodType(getattr(AgentLoopWorker, name), worker))
    out = asyncio.run(AgentLoopWorker._agent_loop_postprocess(worker, verl.model_copy(deep=True), False,
                                                              **both_paths["row"]))
    n_p, n_r = len(verl.prompt_ids), len(verl.response_ids)
    assert out.input_ids[0, 2048 - n_p: 2048].tolist() == verl.prompt_ids
    assert out.input_ids[0, 2048: 2048 + n_r].tolist() == verl.response_ids
    assert out.response_mask[0, :n_r].tolist() == verl.response_mask and out.response_mask[0, n_r:].sum() == 0
    if both_paths["image"]:
        grid = out.multi_modal_inputs["image_grid_thw"]
        assert grid.shape[0] == 1 and out.multi_modal_inputs["pixel_values"].shape[0] == int(grid.prod())


def test_budget_check_and_constrained_rollouts_are_refused(qwen_tokenizer):
    from medrwr.errors import BackendError, ConfigError
    from medrwr.train.verl import ServerClientBackend

    sets = ["rollout.max_rounds=1", "rollout.max_new_tokens_per_turn=32", "rollout.max_total_new_tokens=64",
            "rollout.max_inserted_tokens=48"]
    with pytest.raises(Exception, match="data.max_response_length=100 is below the rollout's worst case 163") as exc:
        _agent(qwen_tokenizer, sets, None, 100)  # hydra.utils.instantiate wraps our error, as in verl
    assert isinstance(exc.value.__cause__, ConfigError)
    with pytest.raises(Exception, match="rollout.constrain must be none") as exc:
        _agent(qwen_tokenizer, [*sets, "rollout.constrain=protocol"], None)
    assert isinstance(exc.value.__cause__, ConfigError)
    backend = ServerClientBackend(None, qwen_tokenizer, asyncio.new_event_loop(), VERL_SAMPLING, engine="sglang")
    with pytest.raises(BackendError, match="never constrained"):
        backend.generate([], ["</query>"], 8, constraints=[object()])

    async def on_the_loop():
        return backend.generate([], ["</query>"], 8)

    with pytest.raises(BackendError, match="runs in a worker thread"):
        asyncio.run(on_the_loop())  # would deadlock: the engine must run in verl's executor thread
    assert backend._params(["</query>"], 8) == {**VERL_SAMPLING, "stop": ["</query>"], "max_tokens": 8,
                                                "no_stop_trim": True}  # SGLang keeps stop strings this way


class ScriptedServerClient:
    """A server-client stand-in without a model: writes SCRIPT's turns per request id and yields to the event
    loop meanwhile, as a remote server does, so concurrent rollouts interleave."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.turns: dict[str, int] = {}
        self.in_flight = self.most_in_flight = 0

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        turn = self.turns.get(request_id, 0)
        self.turns[request_id] = turn + 1
        ids = self.tokenizer.encode(SCRIPT[turn], add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")


def test_concurrent_rollouts_interleave_with_one_session_each(qwen_tokenizer, retrieval_url):
    from medrwr import protocol

    server = ScriptedServerClient(qwen_tokenizer)
    agent = _agent(qwen_tokenizer, ["rollout.max_rounds=1", "rollout.max_new_tokens_per_turn=32",
                                    "rollout.max_total_new_tokens=64", "rollout.max_inserted_tokens=48",
                                    "retrieval.k=2", f"retrieval.url={retrieval_url}"], server)
    prompts = [[{"role": "system", "content": protocol.system_prompt(with_image=False)},
                {"role": "user", "content": protocol.format_question(f"Finding {i}?", ["fever", "rash"])}]
               for i in range(4)]

    async def all_rollouts():
        return await asyncio.gather(*(agent.run(dict(VERL_SAMPLING), raw_prompt=p) for p in prompts))

    outs = asyncio.run(all_rollouts())
    assert server.most_in_flight > 1  # rollouts waited on the server at the same time
    assert sorted(server.turns.values()) == [2, 2, 2, 2]  # four sessions (request ids), two turns each
    assert [o.extra_fields["medrwr_trace"]["answer"] for o in outs] == ["A"] * 4
    assert all(o.response_mask.count(0) > 0 and o.response_logprobs[0] == -0.5 for o in outs)
    assert len({tuple(o.prompt_ids) for o in outs}) == 4  # each output belongs to its own prompt
