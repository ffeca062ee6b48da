"""The one config system: YAML < --set overrides, typed, with errors that name the key and the file."""

from __future__ import annotations

import pytest

from medrwr.config import Config, load_config
from medrwr.errors import ConfigError


def test_defaults_match_method():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.retrieval.k == 3 and cfg.rollout.max_rounds == 3
    assert cfg.cdir.threshold == 0.8
    assert (cfg.rewards.format_weight, cfg.rewards.accuracy_weight) == (1.0, 5.0)
    assert (cfg.rewards.query_weight, cfg.rewards.confidence_weight) == (0.4, 5.0)
    assert cfg.server.host == "127.0.0.1"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("retrieval:\n  k: 7\n  mode: bm25\nrollout:\n  temperature: 0\n")
    cfg = load_config(f, ["retrieval.k=9", "cdir.enabled=true", "eval.benchmarks=[vqa_rad, slake]"])
    assert cfg.retrieval.k == 9 and cfg.retrieval.mode == "bm25"
    assert cfg.rollout.temperature == 0.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.cdir.enabled is True
    assert cfg.eval.benchmarks == ["vqa_rad", "slake"]


@pytest.mark.parametrize(
    "yaml_text,match",
    [
        ("retrieval:\n  kk: 3\n", r"unknown key 'retrieval.kk' in .*c.yaml"),
        ("retrieval:\n  k: three\n", r"retrieval.k in .*c.yaml: expected an integer"),
        ("retrieval:\n  k: true\n", r"retrieval.k .*expected an integer"),
        ("retrieval:\n  mode: semantic\n", r"retrieval.mode .*one of \['bm25', 'dense', 'hybrid'\]"),
        ("cdir:\n  threshold: 1.5\n", r"cdir.threshold must be in \[0, 1\]"),
        ("nonsense:\n  a: 1\n", r"unknown key 'nonsense'"),
        ("retrieval: 3\n", r"retrieval in .*expected a mapping"),
        ("- a\n- b\n", r"must contain a mapping"),
        ("retrieval: [\n", r"not valid YAML"),
    ],
)
def test_bad_files_name_key_and_file(tmp_path, yaml_text, match):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["retrieval.k"])
    with pytest.raises(ConfigError, match="unknown key 'rollout.nope'"):
        load_config(None, ["rollout.nope=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_shipped_configs_load():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "configs/ ships example YAML files"
    for f in files:
        load_config(f)


def test_exponent_floats_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    from medrwr.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-6\n")
    assert load_config(path, ["train.beta=2E-3"]).train.learning_rate == 1e-6
    assert load_config(path, ["train.beta=2E-3"]).train.beta == 2e-3
