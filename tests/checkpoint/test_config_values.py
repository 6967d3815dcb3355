"""Every number moepic reads from config.json is checked, by key: finite, of a sane sign, within a bound.

Python's json reads NaN and Infinity, so a config.json with `"rms_norm_eps": NaN` used to load and
sample from NaN logits (with --greedy: exit 0, token 0 forever). Properties at the end hold the
checks to their contract on arbitrary JSON values.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.checkpoint.hf_config import HFConfig
from moepic.checkpoint.hf_rope import check_rope_angles, rope_spec_from_hf_config
from moepic.checkpoint.load import read_spec
from moepic.checkpoint.limits import MAX_LAYERS, MAX_SIZE
from moepic.core.rope import rope_inv_freq
from moepic.errors import CheckpointError
from tests_support import cli_error

ARGS = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
NAN, INF = float("nan"), float("inf")


def _broken_copy(checkpoint_dir, tmp_path, name: str, changes: dict):
    """A copy of checkpoint `name` with config.json keys changed; a tuple key reaches into a nested object."""
    folder = tmp_path / name
    shutil.copytree(checkpoint_dir(name), folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, last = key if isinstance(key, tuple) else (key,)
        target = config
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(config))  # writes NaN / Infinity as Python's json reads them
    return folder


@pytest.mark.parametrize(
    ("name", "changes", "expected"),
    [
        ("mixtral", {"rms_norm_eps": NAN}, "key 'rms_norm_eps' must be a finite number, got nan"),
        ("mixtral", {"rms_norm_eps": INF}, "key 'rms_norm_eps' must be a finite number, got inf"),
        ("mixtral", {"rms_norm_eps": 0}, "key 'rms_norm_eps' must be > 0, got 0"),
        ("mixtral", {"rms_norm_eps": -1e-6}, "key 'rms_norm_eps' must be > 0, got -1e-06"),
        ("mixtral", {("rope_parameters", "rope_theta"): NAN}, "rope_parameters.rope_theta must be a finite number, got nan"),
        ("mixtral", {("rope_parameters", "rope_theta"): 1}, "rope_parameters.rope_theta must be > 1, got 1"),
        ("mixtral", {("rope_parameters", "rope_type"): 0}, "unsupported RoPE type rope_parameters.rope_type=0; moepic supports default, linear, llama3, yarn, longrope"),
        ("mixtral", {"num_hidden_layers": 10**12}, f"key 'num_hidden_layers' must be in [1, {MAX_LAYERS}], got 1000000000000"),
        ("mixtral", {"hidden_size": 2**40}, f"key 'hidden_size' must be in [1, {MAX_SIZE}], got {2**40}"),
        ("mixtral", {"num_key_value_heads": -2}, f"key 'num_key_value_heads' must be in [1, {MAX_SIZE}], got -2"),
        ("mixtral", {"max_position_embeddings": 0}, f"key 'max_position_embeddings' must be in [1, {MAX_SIZE}], got 0"),
        ("olmoe", {"clip_qkv": NAN}, "key 'clip_qkv' must be a finite number, got nan"),
        ("olmoe", {"clip_qkv": 0}, "key 'clip_qkv' must be > 0, got 0"),
        ("qwen2_moe", {"mlp_only_layers": [7]}, "mlp_only_layers names layer 7, outside [0, 3) (num_hidden_layers)"),
        ("qwen2_moe", {"shared_expert_intermediate_size": -1},
         f"key 'shared_expert_intermediate_size' must be in [0, {MAX_SIZE}], got -1"),
        ("qwen3_moe_yarn_tied", {("rope_parameters", "factor"): 0}, "rope_parameters.factor must be > 0, got 0"),
        ("qwen3_moe_yarn_tied", {("rope_parameters", "factor"): 1e-40},
         "RoPE settings (theta 10000, yarn, factor 1e-40) give non-finite rotation angles within max_position_embeddings 256"),
        ("qwen3_moe_yarn_tied", {("rope_parameters", "beta_fast"): -1}, "rope_parameters.beta_fast must be >= 0, got -1"),
        # DeepSeek: what the core cannot honour is named, never silently run as another model.
        ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported for deepseek_v3; supported: 'sigmoid'"),
        ("deepseek_v3", {"topk_method": "greedy"}, "topk_method 'greedy' is not supported for deepseek_v3; supported: 'noaux_tc'"),
        ("deepseek_v2_lite", {"topk_method": "noaux_tc"},
         "topk_method 'noaux_tc' is not supported for deepseek_v2; supported: 'greedy', 'group_limited_greedy'"),
        ("deepseek_v2_lite", {"scoring_func": "sigmoid"}, "scoring_func 'sigmoid' is not supported for deepseek_v2; supported: 'softmax'"),
        ("deepseek_v2_lite", {"norm_topk_prob": True},
         "norm_topk_prob true is not supported for deepseek_v2 (HF transformers ignores it, DeepSeek's code honours it: moepic will not guess)"),
        ("deepseek_v2_lite", {"moe_layer_freq": 2},
         "moe_layer_freq 2 is not supported for deepseek_v2 (only 1: every layer after the dense ones is MoE)"),
        ("deepseek_v3", {"routed_scaling_factor": 0}, "key 'routed_scaling_factor' must be > 0, got 0"),
        ("deepseek_v3", {"n_group": 3}, "inconsistent model config (num_experts (8) is not a whole number of router groups (3))"),
        ("deepseek_v3", {"kv_lora_rank": 0}, f"key 'kv_lora_rank' must be in [1, {MAX_SIZE}], got 0"),
        ("dots1", {"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
         "layer_types should list 3 of full_attention, sliding_attention, got ['full_attention', 'chunked_attention', 'full_attention']"),
        ("dots1", {"layer_types": ["sliding_attention"] * 3, "sliding_window": None},
         "layer_types names sliding_attention layers but sliding_window is null"),
        ("ernie4_5_moe", {"use_bias": True}, "use_bias true is not supported for ernie4_5_moe (biased expert projections)"),
        ("ernie4_5_moe", {"moe_layer_end_index": -2}, "key 'moe_layer_end_index' must be >= -1, got -2"),
        ("granitemoe", {"logits_scaling": 0}, "key 'logits_scaling' must be > 0, got 0"),
        ("granitemoe", {"attention_multiplier": NAN}, "key 'attention_multiplier' must be a finite number, got nan"),
        ("minimax_m2", {"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported for minimax_m2; supported: 'sigmoid'"),
        ("minimax_m2", {"qk_norm_type": "per_head"}, "minimax_m2 with qk_norm_type 'per_head' / use_qk_norm false is not "
         "supported (HF normalises the full q and k width in every layer)"),
        ("minimax_m2", {"sliding_window": 8}, "sliding-window layers are not supported for minimax_m2"),
        ("minimax_m2", {"rotary_dim": 32, ("rope_parameters", "partial_rotary_factor"): None},
         "rotary_dim 32 is wider than head_dim 16"),
        ("phimoe", {"num_experts_per_tok": 3}, "num_experts_per_tok 3 is not supported for phimoe: SparseMixer routing "
         "chooses 2 experts (as HF's PhiMoE does)"),
        ("phimoe", {("rope_parameters", "long_mscale"): None}, "phimoe's longrope needs short_mscale and long_mscale "
         "(HF's PhiMoE scales by them)"),
        ("phimoe", {("rope_parameters", "short_factor"): [1.0, "x"]},
         "rope_parameters.short_factor must be a number, got 'x'"),
        ("phimoe", {("rope_parameters", "short_factor"): [1.0, 2.0]},
         "unusable RoPE settings (LongRoPE short_factor has 2 values for 4 frequencies)"),
        ("phimoe", {("rope_parameters", "long_factor"): 3}, "rope_parameters.long_factor should be a list of numbers, got 3"),
        ("phimoe", {"router_jitter_noise": -0.1}, "key 'router_jitter_noise' must be > 0, got -0.1"),
        ("llama4_text", {"num_experts_per_tok": 2}, "num_experts_per_tok 2 is not supported for llama4: its router scales "
         "each expert's input, which moepic runs for one expert per token (as Llama-4 ships)"),
        ("llama4_text", {"no_rope_layers": [1, 0]}, "no_rope_layers should list 4 integers in [0, 1], got [1, 0]"),
        ("llama4_text", {"moe_layers": [1, 9]}, "moe_layers should list integers in [0, 3], got [1, 9]"),
        ("llama4_text", {"attention_chunk_size": None}, "layer_types names chunked_attention layers but "
         "attention_chunk_size is null"),
        ("llama4_text", {"layer_types": ["full_attention"] * 3}, "layer_types should list 4 of full_attention, "
         "chunked_attention, got ['full_attention', 'full_attention', 'full_attention']"),
        ("llama4_text", {"attn_temperature_tuning": "yes"}, "attn_temperature_tuning should be true, false or a number, "
         "got 'yes'"),
        ("hunyuan_v1_moe", {("rope_parameters", "alpha"): None}, "RoPE type 'dynamic' is supported with a fixed alpha "
         "(NTK-alpha) only, got alpha None"),
        ("hunyuan_v1_moe", {"num_experts": [4, 4, 8]}, "num_experts [4, 4, 8] differs between layers; moepic runs one "
         "value for all"),
        ("hunyuan_v1_moe", {"moe_topk": [2, 2, 0]}, "moe_topk [2, 2, 0] differs between layers; moepic runs one value for all"),
        ("hunyuan_v1_moe", {"moe_topk": [0, 0, 0]}, "key 'moe_topk' must be in [1, 2147483647], got 0"),
    ],
)
def test_bad_config_number_is_one_line_naming_file_and_key(checkpoint_dir, capsys, tmp_path, name, changes, expected):
    folder = _broken_copy(checkpoint_dir, tmp_path, name, changes)
    assert cli_error(capsys, [*ARGS, "--model", str(folder)]) == f"{folder / 'config.json'}: {expected}"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON (nested too deeply)"),
        ('{"vocab_size": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the limit (4300 digits)"),
    ],
    ids=["deep-nesting", "huge-integer"],
)
def test_config_json_python_cannot_parse_is_named(checkpoint_dir, capsys, tmp_path, content, expected):
    folder = _broken_copy(checkpoint_dir, tmp_path, "mixtral", {})
    (folder / "config.json").write_text(content)
    assert cli_error(capsys, ["inspect", "--model", str(folder)]).startswith(f"{folder / 'config.json'}: {expected}")


def test_unreadable_config_json_is_named(checkpoint_dir, capsys, tmp_path, monkeypatch):
    folder = _broken_copy(checkpoint_dir, tmp_path, "mixtral", {})
    read_text = Path.read_text

    def refuse_config(path, *args, **kwargs):
        if path.name == "config.json":
            raise PermissionError(errno.EACCES, "Permission denied")
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse_config)  # root ignores chmod, so refuse in the reader
    assert cli_error(capsys, ["inspect", "--model", str(folder)]) == f"{folder / 'config.json'}: cannot read (Permission denied)"


def test_llama3_rope_needs_high_freq_factor_at_least_low():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 2.0,
            "original_max_position_embeddings": 8192}
    with pytest.raises(CheckpointError) as info:
        rope_spec_from_hf_config({"rope_parameters": rope}, source="config.json")
    assert str(info.value) == (
        "config.json: rope_parameters.high_freq_factor (2) must be ≥ rope_parameters.low_freq_factor (4)"
    )


def test_llama3_rope_with_equal_factors_has_no_blend_band_and_matches_hf():
    """Llama-4 Scout's: low = high = 1, so every wavelength is either kept or interpolated."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192}
    spec = rope_spec_from_hf_config({"rope_parameters": rope}, source="config.json")
    inv_freq, _ = rope_inv_freq(spec, 128, max_position_embeddings=10485760)
    config = LlamaConfig(hidden_size=128 * 4, num_attention_heads=4, max_position_embeddings=10485760, rope_parameters=rope)
    assert torch.equal(inv_freq, ROPE_INIT_FUNCTIONS["llama3"](config)[0])


def test_inspect_checks_config_json_too(checkpoint_dir, capsys, tmp_path):
    # inspect reads no weights, but the numbers it prints come from the same checked spec.
    folder = _broken_copy(checkpoint_dir, tmp_path, "mixtral", {"rms_norm_eps": NAN})
    assert cli_error(capsys, ["inspect", "--model", str(folder)]).endswith("key 'rms_norm_eps' must be a finite number, got nan")


# --- properties ---------------------------------------------------------------------------------------

# Edge values first: hypothesis draws from the first strategy of one_of most often.
_EDGES = st.sampled_from([NAN, INF, -INF, 10**400, -(10**400), 0, 0.0, -1, 1, 2**31, 1e-40, True, "1"])
_JSON_SCALARS = st.one_of(
    _EDGES,
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=2), inner, max_size=2), max_leaves=4)


@settings(max_examples=200)  # pure and fast: afford more examples than the CI profile's default
@given(
    value=_JSON,
    kind=st.sampled_from([int, float, bool, str]),
    minimum=st.none() | st.integers(-2, 2),
    maximum=st.none() | st.integers(2, 10**6),
    positive=st.booleans(),
)
def test_get_returns_a_value_inside_its_contract_or_raises_one_named_error(value, kind, minimum, maximum, positive):
    cfg = HFConfig({"k": value}, "config.json")
    bounds = dict(minimum=minimum, maximum=maximum, positive=positive) if kind in (int, float) else {}
    try:
        got = cfg.get("k", kind=kind, default="absent", **bounds)
    except CheckpointError as e:
        assert str(e).startswith("config.json: key 'k' ") and "\n" not in str(e)
        return
    if value is None:
        assert got == "absent"
        return
    assert isinstance(got, kind) and (kind is bool or not isinstance(got, bool))
    if kind in (int, float):
        assert math.isfinite(got)
        assert not positive or got > 0
        assert minimum is None or got >= minimum
        assert maximum is None or got <= maximum


_ROPE_NUMBERS = st.one_of(
    _EDGES,
    st.none(),
    st.booleans(),
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1.0, 2.0, 4.0, 32.0, 1e4, 1e-40, 1e300]),
    st.text(max_size=2),
)
_ROPE_KEYS = ["rope_theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "original_max_position_embeddings", "partial_rotary_factor",
              "truncate"]


@settings(max_examples=200)
@given(
    kind=st.sampled_from(["linear", "yarn", "llama3", "default", None, 0, "weird"]),
    knobs=st.dictionaries(st.sampled_from(_ROPE_KEYS), _ROPE_NUMBERS, max_size=6),
    max_positions=st.integers(1, 2**20),
    head_dim=st.sampled_from([8, 16, 64]),
)
def test_accepted_rope_settings_give_finite_angles(kind, knobs, max_positions, head_dim):
    # Whatever config.json says, the loader either names the problem or yields usable frequencies.
    config = {"rope_parameters": {"rope_type": kind, **knobs}, "max_position_embeddings": max_positions}
    try:
        spec = rope_spec_from_hf_config(config, source="config.json")
        check_rope_angles(spec, head_dim, max_positions, source="config.json")
    except CheckpointError as e:
        assert str(e).startswith("config.json: ") and "\n" not in str(e)
        return
    inv_freq, scaling = rope_inv_freq(spec, head_dim, max_position_embeddings=max_positions)
    assert torch.isfinite(inv_freq * max_positions).all()
    assert math.isfinite(scaling) and scaling > 0


@given(
    changes=st.dictionaries(
        st.sampled_from(["vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                         "rms_norm_eps", "num_hidden_layers", "num_local_experts", "num_experts_per_tok",
                         "intermediate_size", "sliding_window", "max_position_embeddings", "tie_word_embeddings",
                         "model_type", "hidden_act", "torch_dtype"]),
        _JSON,
        min_size=1,
        max_size=3,
    )
)
def test_any_config_json_values_give_a_spec_or_one_named_error(checkpoint_dir, tmp_path_factory, changes):
    folder = tmp_path_factory.mktemp("fuzzed")
    shutil.copy(checkpoint_dir("mixtral") / "config.json", folder / "config.json")
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    try:
        spec, cfg = read_spec(folder)
        cfg.checkpoint_dtype()
    except CheckpointError as e:
        assert str(e).startswith(f"{folder / 'config.json'}: ") and "\n" not in str(e)
        return
    assert spec.norm_eps > 0 and math.isfinite(spec.norm_eps)
    assert 1 <= spec.num_layers <= MAX_LAYERS


def test_glm_rotates_half_of_each_head_when_its_config_does_not_say(checkpoint_dir, tmp_path):
    """As HF assumes for glm4_moe (GLM-4.5's own files state 0.5); every other family rotates all."""
    from moepic.checkpoint.load import load_model

    folder = _broken_copy(checkpoint_dir, tmp_path, "glm4_moe", {("rope_parameters", "partial_rotary_factor"): None})
    assert load_model(folder, dtype=torch.float32).spec.rope.partial_rotary_factor == 0.5
    stated = _broken_copy(checkpoint_dir, tmp_path / "stated", "glm4_moe", {("rope_parameters", "partial_rotary_factor"): 0.25})
    assert load_model(stated, dtype=torch.float32).spec.rope.partial_rotary_factor == 0.25


def test_minimax_rotates_the_released_checkpoints_rotary_dim(checkpoint_dir, tmp_path):
    """MiniMax-M2's files say `rotary_dim` (HF turns it into partial_rotary_factor): 8 of 16 here."""
    from moepic.checkpoint.load import load_model

    legacy = _broken_copy(checkpoint_dir, tmp_path, "minimax_m2", {("rope_parameters", "partial_rotary_factor"): None, "rotary_dim": 8})
    assert load_model(legacy, dtype=torch.float32).spec.rope.partial_rotary_factor == 0.5


def test_a_fused_expert_tensor_of_the_wrong_shape_is_named_with_both_shapes(checkpoint_dir, capsys, tmp_path):
    folder = _broken_copy(checkpoint_dir, tmp_path, "granitemoe", {"intermediate_size": 20})
    assert cli_error(capsys, [*ARGS, "--model", str(folder)]).endswith(
        "tensor 'model.layers.0.block_sparse_moe.input_linear.weight' has shape [4, 32, 32], expected [4, 40, 32]"
    )


@pytest.mark.parametrize("name,keys", [
    ("deepseek_v3", ["norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace"]),
    ("glm4_moe", ["norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace"]),
    ("dots1", ["norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace"]),
    ("deepseek_v2_lite", ["norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace"]),
])
def test_a_config_that_leaves_router_keys_out_means_what_hf_assumes(checkpoint_dir, tmp_path, name, keys):
    """Keys left out take HF's defaults for that family (DeepSeek-V3: renormalised, × 2.5, 8 groups,
    top 4, 3 dense layers), read from HF's own config class, never moepic's guess."""
    import transformers

    from moepic.checkpoint.load import read_spec

    folder = _broken_copy(checkpoint_dir, tmp_path, name, {})
    config = json.loads((folder / "config.json").read_text())
    hf = transformers.AutoConfig.for_model(config["model_type"])
    for key in keys:
        config.pop(key, None)
    config.update({"n_routed_experts": 256, "num_experts_per_tok": 8, "num_hidden_layers": 4})  # room for HF's groups
    config.pop("layer_types", None)  # it listed the 3 layers there were
    (folder / "config.json").write_text(json.dumps(config))
    spec, _ = read_spec(folder)
    router = spec.moe.router
    assert router.renormalize == hf.norm_topk_prob and router.scaling == hf.routed_scaling_factor
    assert (router.groups, router.top_groups) == (hf.n_group or 1, hf.topk_group or 1)
    assert spec.layer_kinds.count("dense") == hf.first_k_dense_replace


def test_dots1_without_layer_types_slides_from_max_window_layers_as_hf_does(checkpoint_dir, tmp_path):
    from moepic.checkpoint.load import read_spec

    folder = _broken_copy(checkpoint_dir, tmp_path, "dots1", {"layer_types": None, "max_window_layers": 1, "sliding_window": 5})
    spec, _ = read_spec(folder)
    assert spec.layer_windows == (None, 5, 5) and [spec.window(l) for l in range(3)] == [None, 5, 5]
    unset = _broken_copy(checkpoint_dir, tmp_path / "unset", "dots1", {"layer_types": None, "max_window_layers": None})
    assert read_spec(unset)[0].layer_windows == (None, None, None)  # HF's 62 full layers first
