"""Typed configs and the seed's JSON file."""

import json

import pytest
import torch

from sparseattn import FlexPrefillConfig, MInferenceConfig, XAttentionConfig, load_config
from sparseattn.config import config_from_dict, default_config_path


def test_seed_file_loads(tmp_path):
    cfgs = load_config("config/xattn_config.json")
    assert cfgs["xattention"] == XAttentionConfig(threshold=0.95, stride=16, block_size=64)
    assert cfgs["flexprefill"].sparsity_ratio == 0.2 and cfgs["flexprefill"].block_size == 64
    assert cfgs["minference"].adaptive_budget == 0.1 and cfgs["minference"].block_size == 64
    assert cfgs["streaming"].block_size == 64


def test_repo_file_is_the_packaged_file():
    with open("config/xattn_config.json") as a, open(default_config_path()) as b:
        assert json.load(a) == json.load(b)


def test_nested_sections_override_flat():
    cfgs = config_from_dict({"threshold": 0.9, "xattention": {"threshold": 0.8, "stride": 8}})
    assert cfgs["xattention"].threshold == 0.8 and cfgs["xattention"].stride == 8


def test_per_head_threshold_from_json_list():
    cfgs = config_from_dict({"xattention": {"threshold": [0.9, 0.95]}})
    assert torch.equal(cfgs["xattention"].threshold, torch.tensor([0.9, 0.95]))


@pytest.mark.parametrize("data,exc,match", [
    pytest.param({"treshold": 0.9}, ValueError, r"unknown config key\(s\) \['treshold'\]; valid keys are", id="typo"),
    pytest.param({"stride": "16"}, TypeError, r"XAttentionConfig.stride must be of type int, got str", id="str-int"),
    pytest.param({"stride": 16.0}, TypeError, r"XAttentionConfig.stride must be of type int, got float", id="float-int"),
    pytest.param({"threshold": True}, TypeError, r"threshold must be of type", id="bool-float"),
    pytest.param({"threshold": 2.0}, ValueError, r"threshold must lie in \(0, 1\]", id="range"),
    pytest.param({"stride": 3}, ValueError, r"stride must be one of \[4, 8, 16\]", id="choice"),
    pytest.param({"adaptive_budget": 0}, ValueError, r"adaptive_budget must lie in \(0, 1\]", id="budget"),
    pytest.param({"xattention": {"gamma": 0.9}}, ValueError, r"unknown XAttentionConfig option\(s\) \['gamma'\]", id="section-key"),
    pytest.param({"xattention": 3}, TypeError, r"config section 'xattention' must be an object", id="section-type"),
    pytest.param([1, 2], TypeError, r"a config must be a JSON object", id="not-object"),
])
def test_bad_config(data, exc, match):
    with pytest.raises(exc, match=match):
        config_from_dict(data)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{stride: 16")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_config(bad)


def test_dataclasses_are_frozen_and_validate():
    cfg = FlexPrefillConfig()
    with pytest.raises(Exception):
        cfg.gamma = 0.5
    with pytest.raises(ValueError, match="pattern must be one of"):
        MInferenceConfig(pattern="x")
