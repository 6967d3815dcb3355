"""GGUF files (llama.cpp's checkpoints) load as the families' safetensors folders do: names mapped,
llama's permuted q/k rows restored, experts unstacked; routed experts in Q8_0 / Q4_K / Q6_K stay
blocks (the `gguf` expert format) through the host store, the cache and every copy; everything
computes what transformers' own reading of the file computes, and offloading changes no bit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_writing import gguf_reference_model, write_gguf, write_gpt_oss_gguf
from moepic.cache.layout import plan_layout
from moepic.checkpoint.load import load_model, read_spec
from moepic.core.weights import MoEWeights
from moepic.errors import CheckpointError
from moepic.policies import POLICIES
from moepic.quant import QuantizedExpert, build_format
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from moepic.sim.shapes import model_shape
from tests_support import assert_slots_hold_the_host_bytes, cli_error, dense_run, policy_for

PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]


@pytest.fixture(scope="module")
def gguf_file(checkpoint_dir, tmp_path_factory):
    """(checkpoint, experts' kind, residents' kind) → a GGUF file of it (gguf_writing.write_gguf)."""
    made = {}

    def get(name: str, experts="F32", resident: str = "F32") -> Path:
        key = (name, experts, resident)
        if key not in made:
            label = "-".join(experts) if isinstance(experts, tuple) else experts
            made[key] = write_gguf(checkpoint_dir(name), tmp_path_factory.mktemp("gguf") / f"{name}-{label}-{resident}.gguf",
                                   experts=experts, resident=resident)
        return made[key]

    return get


def run(model, tokens: int = 5, **kwargs):
    return generate(model, PROMPT, max_new_tokens=tokens, eos_ids=(), keep_logits=True, **kwargs)


def first_expert(model):
    return next(lw.ffn.experts[0] for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights))


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral", "qwen3_moe_yarn_tied", "olmoe", "olmoe_linear_rope"])
def test_a_float_gguf_computes_exactly_what_its_safetensors_checkpoint_does(checkpoint_dir, gguf_file, name):
    """Names, the llama architecture's q/k row order (Mixtral), Qwen2-MoE's shared expert and its
    [D] gate, dense layers, YaRN from the rope metadata, tied embeddings, OLMoE's full-width q/k norms
    and its clamp (clip_qkv), linear rope scaling: any slip changes a logit."""
    assert read_spec(gguf_file(name))[0] == read_spec(checkpoint_dir(name))[0]
    ours, reference = run(load_model(gguf_file(name))), run(load_model(checkpoint_dir(name)))
    assert ours.token_ids == reference.token_ids
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, reference.logits))


@pytest.mark.parametrize("name", ["gpt_oss_llamacpp", "gpt_oss_llamacpp_mxfp4"])
def test_a_gpt_oss_gguf_computes_exactly_what_its_safetensors_checkpoint_does(checkpoint_dir, tmp_path, name):
    """GPT-OSS's experts fused on disk are assembled from the file's per-projection stacks (gate and
    up interleaved by neuron, their biases, down transposed); its sinks, router with bias,
    post-attention norm, sliding layers, YaRN; MXFP4 experts stay the `mxfp4` format's blocks (GGUF's
    nibble order turned into OCP's): the same spec, and every logit bit for bit."""
    path = write_gpt_oss_gguf(checkpoint_dir(name), tmp_path / f"{name}.gguf")
    assert read_spec(path)[0] == read_spec(checkpoint_dir(name))[0]
    model, reference = load_model(path), load_model(checkpoint_dir(name))
    if name.endswith("mxfp4"):
        expert = first_expert(model)
        assert isinstance(expert, QuantizedExpert) and expert.format.name == "mxfp4"
        assert all(torch.equal(a, b) for a, b in zip(expert.parts, first_expert(reference).parts, strict=True))
    ours, theirs = run(model), run(reference)
    assert ours.token_ids == theirs.token_ids
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))


def test_offloaded_gpt_oss_gguf_mxfp4_experts_equal_their_all_resident_run(checkpoint_dir, tmp_path):
    model = load_model(write_gpt_oss_gguf(checkpoint_dir("gpt_oss_llamacpp_mxfp4"), tmp_path / "g.gguf"))
    resident, trace = dense_run(model, PROMPT, 5)
    for share, theta in ((0.3, 0.5), (0.0, 0.0)):
        layout = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.5, expert_format=first_expert(model).format)
        budget = layout.staging_bytes + int(share * (layout.expert_bytes - layout.staging_bytes))
        engine = offloaded_experts(model, budget, theta, policy=policy_for("lru", trace))
        offloaded = run(model, 5, experts=engine)
        assert offloaded.token_ids == resident.token_ids
        assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, resident.logits))
        assert_slots_hold_the_host_bytes(engine)


def test_gpt_oss_experts_in_another_kind_are_named_with_the_way_out(capsys, checkpoint_dir, tmp_path):
    path = write_gpt_oss_gguf(checkpoint_dir("gpt_oss_llamacpp"), tmp_path / "q8.gguf", experts="Q8_0")
    assert cli_error(capsys, ["inspect", "--model", str(path)]).startswith(
        f"{path}: GPT-OSS's routed experts stay blocks in MXFP4 only; these are Q8_0; load it with --expert-format dense")
    dense = load_model(path, expert_format=build_format("dense"))  # dequantised as the gguf package does
    assert not isinstance(first_expert(dense), QuantizedExpert)
    assert run(dense, 2).token_ids == run(load_model(checkpoint_dir("gpt_oss_llamacpp")), 2).token_ids


def reference_logits(path: Path, source: Path) -> torch.Tensor:
    """transformers' logits for the prompt from its own reading of the GGUF file."""
    config = json.loads((source / "config.json").read_text())
    model = gguf_reference_model(path, moe_intermediate_size=config["moe_intermediate_size"],
                                 norm_topk_prob=config["norm_topk_prob"])
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0, -1]


@pytest.mark.parametrize("experts,resident", [("Q8_0", "F32"), (("Q4_K", "Q6_K"), "Q8_0"), (("Q8_0", "Q6_K"), "F16"),
                                              (("Q4_K", "Q4_K"), "BF16")])
def test_block_quantized_experts_stay_blocks_and_compute_what_transformers_reads(checkpoint_dir, gguf_file, experts, resident):
    path = gguf_file("qwen3_moe_256", experts, resident)
    model = load_model(path)
    expert = first_expert(model)
    gate_up, down = experts if isinstance(experts, tuple) else (experts, experts)
    assert isinstance(expert, QuantizedExpert) and expert.format.config.as_dict() == {"name": "gguf", "gate_up": gate_up, "down": down}
    assert all(p.dtype == torch.uint8 for p in expert.parts)  # blocks, not weights
    logits = run(model, 1).logits[0]  # the prompt's last position
    torch.testing.assert_close(logits, reference_logits(path, checkpoint_dir("qwen3_moe_256")), atol=2e-5, rtol=1e-5)


def test_an_experts_blocks_decode_to_the_gguf_packages_dequantisation_bit_for_bit(gguf_file):
    path = gguf_file("qwen3_moe_256", ("Q4_K", "Q6_K"))
    model = load_model(path)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for e in (0, 3):
        weights = model.weights.layers[1].ffn.experts[e].dense()
        F = weights.ffn_size
        gate, up, down = (gguf.quants.dequantize(tensors[f"blk.1.ffn_{p}_exps.weight"].data[e], tensors[f"blk.1.ffn_{p}_exps.weight"].tensor_type)
                          for p in ("gate", "up", "down"))
        gate_up_N2BD = weights.gate_up_N2BD
        assert torch.equal(gate_up_N2BD[:, 0].reshape(F, -1), torch.from_numpy(gate))
        assert torch.equal(gate_up_N2BD[:, 1].reshape(F, -1), torch.from_numpy(up))
        assert torch.equal(weights.down_FD, torch.from_numpy(down).t())


@settings(max_examples=12, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    share=st.floats(0.0, 1.0),
    theta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    new_tokens=st.integers(1, 4),
)
def test_offloaded_gguf_experts_equal_their_all_resident_run_bit_for_bit(gguf_file, policy, share, theta, new_tokens):
    """Q8_0 down blocks span 32 neurons: the 256-neuron experts split at 8 points."""
    model = loaded(gguf_file("qwen3_moe_256", "Q8_0"))
    resident, trace = dense_run(model, PROMPT, new_tokens)
    expert = first_expert(model)
    layout = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.5, expert_format=expert.format)
    budget = layout.staging_bytes + int(share * max(0, layout.expert_bytes - layout.staging_bytes))
    engine = offloaded_experts(model, budget, theta, policy=policy_for(policy, trace))
    offloaded = generate(model, PROMPT, max_new_tokens=new_tokens, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, resident.logits))
    assert_slots_hold_the_host_bytes(engine)


_LOADED = {}


def loaded(path: Path):
    """One model per file for the hypothesis test above (fixtures are not re-run per example)."""
    if path not in _LOADED:
        _LOADED[path] = load_model(path)
    return _LOADED[path]


def test_a_k_quant_miss_moves_the_blocks_bytes(gguf_file):
    """Q4_K gate/up and Q6_K down: (2·144 + 210)·D/256 bytes a neuron; θ = 0 loads every routed expert whole."""
    model = load_model(gguf_file("qwen3_moe_256", ("Q4_K", "Q6_K")))
    D, F = model.spec.hidden_size, model.spec.moe.expert_ffn
    expert_bytes = F * (2 * 144 + 210) * D // 256
    resident, trace = dense_run(model, PROMPT, 3)
    layout = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.0, expert_format=first_expert(model).format)
    engine = offloaded_experts(model, layout.staging_bytes, 0.0, policy=policy_for("lru", trace))
    offloaded = generate(model, PROMPT, max_new_tokens=3, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids
    assert engine.layout.layers[0].expert_bytes == expert_bytes
    assert engine.counters.demand_bytes == engine.host_to_device_bytes > 0
    assert engine.counters.demand_bytes % expert_bytes == 0


def test_dense_expert_format_dequantises_the_blocks_on_load(gguf_file):
    path = gguf_file("qwen3_moe_256", ("Q4_K", "Q6_K"))
    from moepic.quant import build_format

    kept, dense = load_model(path), load_model(path, expert_format=build_format("dense"))
    named = load_model(path, expert_format=build_format({"name": "gguf", "gate_up": "Q4_K", "down": "Q6_K"}))
    assert torch.equal(first_expert(named).parts[0], first_expert(kept).parts[0])  # its own format, asked by name: kept
    assert not isinstance(first_expert(dense), QuantizedExpert)
    assert torch.equal(first_expert(dense).down_FD, first_expert(kept).dense().down_FD)
    assert run(kept, 2).token_ids == run(dense, 2).token_ids


def test_generate_and_inspect_take_a_gguf_file(capsys, gguf_file):
    from moepic.cli import main

    path = str(gguf_file("qwen3_moe_256", ("Q4_K", "Q6_K")))
    assert main(["generate", "--model", path, "--prompt-ids", "1,17,5", "--max-new-tokens", "3", "--budget", "0.5",
                 "--theta", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 3
    assert main(["inspect", "--model", path]) == 0
    assert "gguf" in capsys.readouterr().out


# -- bad input ------------------------------------------------------------------------------------

def rewritten(path: Path, out: Path, replaced: dict) -> Path:
    """`path` with the tensors of `replaced` (name → a gguf ReaderTensor or a float32 array) swapped in."""
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        source = replaced.get(t.name, t)
        if isinstance(source, np.ndarray):
            writer.add_tensor(t.name, source)
        else:
            writer.add_tensor(t.name, np.array(source.data), raw_dtype=source.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def mixed_down_kinds(checkpoint_dir, tmp_path) -> Path:
    """A Q4_K_M-like file: layer 0's down in Q6_K, layer 1's in Q4_K (llama.cpp varies it by layer)."""
    path = write_gguf(checkpoint_dir("qwen3_moe_256"), tmp_path / "a.gguf", experts=("Q4_K", "Q6_K"))
    other = write_gguf(checkpoint_dir("qwen3_moe_256"), tmp_path / "b.gguf", experts=("Q4_K", "Q4_K"))
    donor = {t.name: t for t in gguf.GGUFReader(other).tensors}
    return rewritten(path, tmp_path / "mixed.gguf", {"blk.1.ffn_down_exps.weight": donor["blk.1.ffn_down_exps.weight"]})


def test_kinds_varying_by_layer_stay_blocks_in_each_layers_format(capsys, checkpoint_dir, tmp_path):
    """As in a Q4_K_M file: each layer keeps its own kinds, the cache and staging size each layer's
    experts by its own bytes, offloading changes no bit, and everything matches transformers."""
    path = mixed_down_kinds(checkpoint_dir, tmp_path)
    model = load_model(path)
    formats = [lw.ffn.experts[0].format.config.down for lw in model.weights.layers]
    assert formats == ["Q6_K", "Q4_K"]
    logits = run(model, 1).logits[0]
    torch.testing.assert_close(logits, reference_logits(path, checkpoint_dir("qwen3_moe_256")), atol=2e-5, rtol=1e-5)
    resident, trace = dense_run(model, PROMPT, 4)
    engine = offloaded_experts(model, 0.4, 0.0, policy=policy_for("lru", trace))
    offloaded = generate(model, PROMPT, max_new_tokens=4, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids
    assert all(torch.equal(a, b) for a, b in zip(offloaded.logits, resident.logits))
    D, F = 256, 256
    assert [l.expert_bytes for l in engine.layout.layers] == [F * (2 * 144 + 210) * D // 256, F * 3 * 144 * D // 256]
    assert engine.layout.staging_bytes == engine.layout.staging_experts * engine.layout.layers[0].expert_bytes
    assert_slots_hold_the_host_bytes(engine)
    assert main_ok(["inspect", "--model", str(path)])
    assert "per-layer gguf (gate_up Q4_K, down Q6_K) on 1 layers + gguf (gate_up Q4_K, down Q4_K) on 1 layers" in capsys.readouterr().out
    shape = model_shape(str(path))  # what simulate, compare and configure price it with: each layer its own bytes
    assert [f.config.down for f in shape.expert_formats] == ["Q6_K", "Q4_K"]
    assert shape.expert_bytes == 4 * sum(l.expert_bytes for l in engine.layout.layers)


def test_simulate_and_configure_price_each_layers_format(capsys, checkpoint_dir, tmp_path):
    from moepic.tracing.trace import save_trace

    path = mixed_down_kinds(checkpoint_dir, tmp_path)
    _, trace = dense_run(load_model(path), PROMPT, 6)
    save_trace(trace, tmp_path / "run.npz")
    common = ["--trace", str(tmp_path / "run.npz"), "--model", str(path), "--hardware", "a6000", "--budget", "0.9", "--json"]
    assert main_ok(["simulate", *common, "--baseline", "moepic", "--recall", "0.8"])
    simulated = json.loads(capsys.readouterr().out)
    assert main_ok(["configure", *common])
    configured = json.loads(capsys.readouterr().out)
    F = D = 256
    q6_layer, q4_layer = F * (2 * 144 + 210) * D // 256, F * 3 * 144 * D // 256  # expert bytes of layers 0 and 1
    budget = int(0.9 * 4 * (q6_layer + q4_layer))  # a share of every expert's bytes, each layer in its format
    assert configured["budget_bytes"] == budget
    for report in (simulated, configured):
        assert report["staging_bytes"] > 0 and report["staging_bytes"] % q6_layer == 0  # staging holds the larger experts
    assert simulated["cache_bytes"] + simulated["staging_bytes"] <= budget
    assert sum(l["budget_bytes"] for l in configured["layers"]) + configured["staging_bytes"] <= budget


def test_a_kind_moepic_does_not_keep_is_named_with_the_way_out(capsys, checkpoint_dir, tmp_path):
    path = write_gguf(checkpoint_dir("qwen3_moe_256"), tmp_path / "q5.gguf", experts=("Q5_K", "Q5_K"))
    message = cli_error(capsys, ["generate", "--model", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "1"])
    assert message == (f"{path}: blk.0's routed experts cannot stay blocks: Q5_K blocks are not kept (kept: Q8_0, "
                       "Q4_K, Q6_K); load it with --expert-format dense (dequantised) or int4 (re-encoded)")
    from moepic.quant import build_format

    dense = load_model(path, expert_format=build_format("dense"))  # dequantised by the gguf package's reference
    torch.testing.assert_close(run(dense, 1).logits[0], reference_logits(path, checkpoint_dir("qwen3_moe_256")),
                               atol=2e-5, rtol=1e-5)


def main_ok(argv) -> bool:
    from moepic.cli import main

    return main(argv) == 0


def test_a_file_that_is_not_gguf_an_unsupported_architecture_and_a_missing_tensor_are_one_line(capsys, checkpoint_dir, gguf_file, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    assert cli_error(capsys, ["inspect", "--model", str(junk)]).startswith(f"{junk}: not a readable GGUF file")
    with pytest.raises(CheckpointError, match="GGUF architecture 'deepseek' is not supported; supported: qwen3moe, qwen2moe, olmoe, gpt-oss, llama"):
        read_spec(retitled(gguf_file("qwen3_moe"), tmp_path, "deepseek"))
    missing = write_gguf(checkpoint_dir("qwen3_moe"), tmp_path / "missing.gguf", drop=("blk.1.attn_k_norm.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensor 'blk.1.attn_k_norm.weight' \(model.layers.1.self_attn.k_norm.weight\)"):
        load_model(missing)


def test_quantize_points_a_gguf_file_to_loading_it_as_it_is(capsys, gguf_file, tmp_path):
    path = gguf_file("qwen3_moe")
    assert cli_error(capsys, ["quantize", "--model", str(path), "--format", "int4", "--out", str(tmp_path / "q")]) == (
        f"{path}: a GGUF file keeps its experts quantized already and loads as it is (--model FILE.gguf); "
        "`moepic quantize` rewrites safetensors folders")
    assert not (tmp_path / "q").exists()


def test_a_weight_holding_nan_or_too_large_for_the_dtype_is_named(gguf_file, tmp_path):
    """As safetensors files are checked (files.py): a NaN stored in the file, or a value the cast overflows."""
    path = gguf_file("qwen3_moe")
    weight = gguf.GGUFReader(path)
    norm = next(t for t in weight.tensors if t.name == "blk.1.ffn_norm.weight")
    for value, stored, dtype, reason in (
        (np.nan, np.float32, torch.float32, "has 1 NaN or Inf value(s)"),
        (1e39, np.float64, torch.bfloat16, "has 1 value(s) too large for bfloat16 (load it in a wider dtype)"),  # an F64 tensor
    ):
        bad = np.array(norm.data, dtype=stored)
        bad[3] = value
        broken = rewritten(path, tmp_path / f"{stored.__name__}.gguf", {norm.name: bad})
        with pytest.raises(CheckpointError, match=re.escape(f"tensor 'blk.1.ffn_norm.weight' {reason}")):
            load_model(broken, dtype=dtype)


def retitled(path: Path, tmp_path: Path, arch: str) -> Path:
    """`path` with general.architecture set to `arch` (as long as qwen3moe, so no offset moves)."""
    data, old = path.read_bytes(), b"qwen3moe"
    assert len(arch) == len(old)
    at = data.index(old)  # general.architecture is the file's first string value
    out = tmp_path / f"{arch}.gguf"
    out.write_bytes(data[:at] + arch.encode() + data[at + len(old) :])
    return out
