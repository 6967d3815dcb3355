"""checkpoint/hf_rope.py: config.json RoPE layouts → RopeSpec, and one-line errors that name file and key."""

from __future__ import annotations

import pytest

from moepic.checkpoint.hf_rope import rope_spec_from_hf_config
from moepic.core.spec import RopeSpec
from moepic.errors import CheckpointError

SOURCE = "/models/tiny/config.json"


def parse(config: dict, **kwargs) -> RopeSpec:
    return rope_spec_from_hf_config(config, source=SOURCE, **kwargs)


def test_top_level_rope_theta_gives_default_kind():
    assert parse({"rope_theta": 1e6}) == RopeSpec(theta=1e6)


def test_missing_everywhere_defaults_to_theta_10000_unless_the_adapter_says_otherwise():
    assert parse({}) == RopeSpec(theta=10000.0)
    assert parse({"rope_scaling": None}) == RopeSpec(theta=10000.0)
    assert parse({}, default_theta=1e6) == RopeSpec(theta=1e6)


def test_rope_parameters_layout_reads_every_yarn_knob():
    spec = parse({
        "rope_theta": 1.0,  # the dict's own rope_theta wins, as in transformers
        "max_position_embeddings": 163840,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000, "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False,
            "partial_rotary_factor": 0.5,
        },
    })
    assert spec == RopeSpec(
        theta=10000.0, kind="yarn", factor=40.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0,
        mscale=0.707, mscale_all_dim=1.0, truncate=False, partial_rotary_factor=0.5,
    )


def test_rope_type_default_ignores_scaling_knobs():
    spec = parse({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "factor": 8.0}})
    assert spec == RopeSpec(theta=5e5)


def test_legacy_rope_scaling_with_type_key():
    spec = parse({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4}})
    assert spec == RopeSpec(theta=1e6, kind="linear", factor=4.0)


def test_truthy_rope_scaling_wins_over_rope_parameters():
    spec = parse({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}})
    assert spec.kind == "linear"


def test_llama3_keys():
    spec = parse({
        "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    })
    assert spec == RopeSpec(theta=5e5, kind="llama3", factor=8.0, original_max_position=8192)


def test_partial_rotary_factor_inside_the_dict_wins_over_top_level():
    assert parse({"partial_rotary_factor": 0.5}).partial_rotary_factor == 0.5
    both = {"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}
    assert parse(both).partial_rotary_factor == 0.25


def test_yarn_original_length_precedence():
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    assert parse({"rope_parameters": rope, "max_position_embeddings": 32768}).original_max_position == 8192
    # transformers lets a top-level value override the dict's (kept for Phi-3 checkpoints).
    top = {"rope_parameters": rope, "original_max_position_embeddings": 2048}
    assert parse(top).original_max_position == 2048
    bare = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 4096}
    assert parse(bare).original_max_position == 4096


def test_yarn_null_factor_is_the_context_extension_ratio():
    config = {"rope_parameters": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096},
              "max_position_embeddings": 16384}
    assert parse(config).factor == 4.0


def test_yarn_null_truncate_disables_truncation_like_transformers():
    config = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "truncate": None}, "max_position_embeddings": 4096}
    assert parse(config).truncate is False


def _error(config: dict) -> str:
    with pytest.raises(CheckpointError) as info:
        parse(config)
    message = str(info.value)
    assert SOURCE in message and "\n" not in message
    return message


@pytest.mark.parametrize(
    "config, key, value",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type", "'dynamic'"),
        ({"rope_parameters": {"rope_type": "su", "short_factor": [1.0]}}, "rope_parameters.rope_type", "'su'"),
        ({"rope_parameters": {"rope_type": "mrope"}}, "rope_parameters.rope_type", "'mrope'"),
    ],
)
def test_unsupported_kinds_name_key_value_and_supported_kinds(config, key, value):
    message = _error(config)
    assert f"{key}={value}" in message
    assert "default, linear, llama3, yarn, longrope" in message


@pytest.mark.parametrize(
    "config, key, value",
    [
        ({"rope_theta": "10000"}, "rope_theta", "'10000'"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_parameters.rope_theta", "'big'"),
        ({"rope_scaling": {"type": "linear", "factor": "2x"}}, "rope_scaling.factor", "'2x'"),
        ({"rope_scaling": {"type": "linear", "factor": True}}, "rope_scaling.factor", "True"),
        ({"rope_theta": -1.0}, "rope_theta", "-1.0"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor", "1.5"),
    ],
)
def test_bad_numbers_name_key_and_value(config, key, value):
    message = _error(config)
    assert key in message and value in message


def test_missing_required_scaling_key_is_named():
    assert "rope_scaling.factor" in _error({"rope_scaling": {"type": "linear"}})
    message = _error({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}})
    assert "rope_scaling.low_freq_factor" in message


def test_per_layer_rope_parameters_are_refused():
    message = _error({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}})
    assert "rope_parameters" in message and "per layer" in message
