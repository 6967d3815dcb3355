"""core/rope.py: reference parity with transformers' RoPE, plus rotation invariants (hypothesis)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepic.checkpoint.hf_rope import rope_spec_from_hf_config
from moepic.core.rope import apply_rope, rope_cos_sin, rope_inv_freq
from moepic.core.spec import RopeSpec

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.glm4_moe import modeling_glm4_moe as glm  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as mixtral  # noqa: E402

HYPOTHESIS = settings(max_examples=50, deadline=None, derandomize=True)

# (config.json fragment, head_dim). Each is fed both to transformers and to our parser.
CASES = {
    "default-top-level-theta": ({"rope_theta": 10000.0}, 16),
    "default-rope-parameters": ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000}}, 64),
    "default-partial-0.5": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, 32),
    "linear-legacy-type-key": ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0}, 16),
    "linear-partial-0.5": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}, "partial_rotary_factor": 0.5}, 64),
    "llama3-3.1": (
        {
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072,
        },
        128,
    ),
    "llama3-legacy-32x": (
        {
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "rope_theta": 500000.0,
            "max_position_embeddings": 131072,
        },
        64,
    ),
    "yarn-plain": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6},
         "max_position_embeddings": 131072},
        128,
    ),
    "yarn-deepseek-mscale-equal": (
        {"rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
                          "original_max_position_embeddings": 4096}, "rope_theta": 10000, "max_position_embeddings": 163840},
        64,
    ),
    "yarn-mscale-differs": (
        {"rope_scaling": {"type": "yarn", "factor": 16.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096}, "rope_theta": 10000.0, "max_position_embeddings": 65536},
        64,
    ),
    "yarn-no-truncate": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 4096, "rope_theta": 150000}, "max_position_embeddings": 131072},
        64,
    ),
    "yarn-attention-factor-betas": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.9, "beta_fast": 16.0, "beta_slow": 2.0,
                             "original_max_position_embeddings": 2048, "rope_theta": 10000.0}, "max_position_embeddings": 16384},
        32,
    ),
    "yarn-partial-0.5": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "rope_theta": 1e6,
                             "partial_rotary_factor": 0.5}, "max_position_embeddings": 16384},
        64,
    ),
    "yarn-null-factor-uses-length-ratio": (
        {"rope_parameters": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096, "rope_theta": 1e4},
         "max_position_embeddings": 32768},
        32,
    ),
    "yarn-top-level-original-length-wins": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 1e4},
         "original_max_position_embeddings": 2048, "max_position_embeddings": 16384},
        32,
    ),
    "yarn-original-length-defaults-to-max": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "max_position_embeddings": 4096},
        32,
    ),
}


def _hf_config(config_json: dict, head_dim: int):
    # HF mutates the dicts it is given (adds rope_type/rope_theta), so hand it a copy.
    # head_dim is passed explicitly: HF's yarn reads getattr(config, "head_dim", ...) and MixtralConfig's is None.
    return transformers.MixtralConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, **copy.deepcopy(config_json)
    )


def _hf_inv_freq(config) -> tuple[torch.Tensor, float]:
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        # "default" is not in ROPE_INIT_FUNCTIONS; each model has its own. GLM-4-MoE's honours partial rotary.
        return glm.Glm4MoeRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, None)


def _ours(config_json: dict, head_dim: int) -> RopeSpec:
    return rope_spec_from_hf_config(config_json, source="case/config.json")


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_attention_scaling_match_transformers(name):
    config_json, head_dim = CASES[name]
    want_inv, want_scale = _hf_inv_freq(_hf_config(config_json, head_dim))
    got_inv, got_scale = rope_inv_freq(_ours(config_json, head_dim), head_dim)
    assert got_inv.dtype == torch.float32 and got_inv.shape == want_inv.shape
    torch.testing.assert_close(got_inv, want_inv.float(), rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(want_scale, rel=1e-12)


def test_default_matches_mixtral_own_default_init():
    config_json, head_dim = CASES["default-rope-parameters"]
    want, _ = mixtral.MixtralRotaryEmbedding.compute_default_rope_parameters(_hf_config(config_json, head_dim))
    torch.testing.assert_close(rope_inv_freq(_ours(config_json, head_dim), head_dim)[0], want, rtol=1e-6, atol=0)


def test_max_position_embeddings_stands_in_for_missing_original_length():
    spec = RopeSpec(theta=1e4, kind="yarn", factor=4.0, original_max_position=4096)
    loose = RopeSpec(theta=1e4, kind="yarn", factor=4.0)
    assert torch.equal(rope_inv_freq(loose, 32, max_position_embeddings=4096)[0], rope_inv_freq(spec, 32)[0])
    with pytest.raises(ValueError, match="original_max_position"):
        rope_inv_freq(loose, 32)


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="dynamic"):
        rope_inv_freq(RopeSpec(theta=1e4, kind="dynamic"), 16)


@pytest.mark.parametrize(
    "name, module",
    [("default-top-level-theta", mixtral), ("yarn-deepseek-mscale-equal", mixtral), ("llama3-3.1", mixtral),
     ("default-partial-0.5", glm), ("yarn-partial-0.5", glm)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_and_rotation_match_transformers(name, module, dtype):
    config_json, head_dim = CASES[name]
    config = _hf_config(config_json, head_dim)
    rotary = (module.MixtralRotaryEmbedding if module is mixtral else module.Glm4MoeRotaryEmbedding)(config)
    gen = torch.Generator().manual_seed(0)
    positions_T = torch.randint(0, 20000, (7,), generator=gen)
    q = torch.randn(1, 4, 7, head_dim, generator=gen).to(dtype)
    k = torch.randn(1, 2, 7, head_dim, generator=gen).to(dtype)
    want_cos, want_sin = rotary(q, positions_T[None])
    want_q, want_k = module.apply_rotary_pos_emb(q, k, want_cos, want_sin)

    inv_freq, scaling = rope_inv_freq(_ours(config_json, head_dim), head_dim)
    cos_Td, sin_Td = rope_cos_sin(inv_freq, scaling, positions_T, dtype)
    assert cos_Td.dtype == dtype
    torch.testing.assert_close(cos_Td, want_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin_Td, want_sin[0], rtol=0, atol=1e-6)
    # Leading dims are free: [B, H, T, d] against [T, r].
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(apply_rope(q, cos_Td, sin_Td), want_q, rtol=0, atol=atol)
    torch.testing.assert_close(apply_rope(k[0], cos_Td, sin_Td), want_k[0], rtol=0, atol=atol)


def _rotated(head_dim: int, partial: float, theta: float, positions: list[int], seed: int):
    spec = RopeSpec(theta=theta, partial_rotary_factor=partial)
    inv_freq, scaling = rope_inv_freq(spec, head_dim)
    cos_Td, sin_Td = rope_cos_sin(inv_freq, scaling, torch.tensor(positions), torch.float32)
    x_HTd = torch.randn(3, len(positions), head_dim, generator=torch.Generator().manual_seed(seed))
    return x_HTd, apply_rope(x_HTd, cos_Td, sin_Td), cos_Td.shape[-1]


@HYPOTHESIS
@given(
    head_dim=st.sampled_from([4, 8, 16, 64, 128]),
    partial=st.sampled_from([0.25, 0.5, 1.0]),
    theta=st.floats(100.0, 1e7),
    positions=st.lists(st.integers(0, 100_000), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_rotation_preserves_each_pair_norm_and_passes_the_rest_through(head_dim, partial, theta, positions, seed):
    x, y, rot = _rotated(head_dim, partial, theta, positions, seed)
    half = rot // 2
    pair_norm = lambda t: torch.hypot(t[..., :half], t[..., half:rot])  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(y[..., rot:], x[..., rot:])


@HYPOTHESIS
@given(
    head_dim=st.sampled_from([8, 32, 64]),
    theta=st.floats(100.0, 1e6),
    m=st.integers(0, 512),
    n=st.integers(0, 512),
    shift=st.integers(0, 512),
    seed=st.integers(0, 2**16),
)
def test_query_key_dot_product_depends_only_on_relative_position(head_dim, theta, m, n, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    q_d, k_d = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    inv_freq, _ = rope_inv_freq(RopeSpec(theta=theta), head_dim)

    def dot(pq: int, pk: int) -> float:
        cos_Td, sin_Td = rope_cos_sin(inv_freq, 1.0, torch.tensor([pq, pk]), torch.float32)
        rq, rk = apply_rope(torch.stack([q_d, k_d])[:, None], cos_Td, sin_Td).unbind(0)
        return float((rq[0] * rk[1]).double().sum())

    # float32 angles at positions ≤ 1024 carry ~1e-4 rad error; the bound scales with |q||k|.
    tol = 1e-4 * float(q_d.norm() * k_d.norm()) + 1e-5
    assert math.isclose(dot(m, n), dot(m + shift, n + shift), abs_tol=tol)
