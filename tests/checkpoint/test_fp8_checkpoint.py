"""Block-scaled FP8 checkpoints (DeepSeek-V3, Qwen3-FP8 releases): every e4m3 weight is read
through its `weight_scale_inv` as HF dequantises it, routed experts stay e4m3 (the `fp8` expert
format) and compute exactly what the dequantised checkpoint computes; a missing or misshapen scale
is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moepic.cache.layout import plan_layout
from moepic.checkpoint.load import load_model
from moepic.core.weights import MoEWeights
from moepic.quant import QuantizedExpert, build_format
from moepic.quant.e4m3 import dequantize_fp8_blocks
from moepic.runtime.generation import generate
from moepic.runtime.offload import offloaded_experts
from tests_support import cli_error, dense_run, policy_for

PROMPT = [1, 17, 5, 42, 8, 33, 9, 60, 21, 4, 77, 12]
KEPT = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm")  # as the releases keep them in bf16


def fp8_blocks(w_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w_RC` in e4m3 with a float32 scale_inv per 128×128 block (what the releases store)."""
    R, C = w_RC.shape
    gr, gc = -(-R // 128), -(-C // 128)
    padded = torch.nn.functional.pad(w_RC.float(), (0, gc * 128 - C, 0, gr * 128 - R)).view(gr, 128, gc, 128)
    scale = (padded.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
    q = (padded / scale[:, None, :, None]).clamp(-448, 448).view(gr * 128, gc * 128)[:R, :C].to(torch.float8_e4m3fn)
    return q, scale


def write_fp8(src, out, dequantised):
    """An FP8 copy of `src` (`out`) and its exact dequantisation in float32 (`dequantised`)."""
    for folder in (out, dequantised):
        shutil.copytree(src, folder)
    tensors = load_file(src / "model.safetensors")
    fp8, deq = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.endswith(".weight") and not any(k in name for k in KEPT):
            q, scale = fp8_blocks(t)
            fp8[name], fp8[f"{name}_scale_inv"] = q, scale
            deq[name] = dequantize_fp8_blocks(q, scale, torch.float32)
        else:
            fp8[name], deq[name] = t, t.float()
    save_file(fp8, out / "model.safetensors", metadata={"format": "pt"})
    save_file(deq, dequantised / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def pair(request, checkpoint_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fp8_{request.param}")
    write_fp8(checkpoint_dir(request.param), tmp / "fp8", tmp / "dequantised")
    return tmp / "fp8", tmp / "dequantised"


def routed(model):
    return [e for lw in model.weights.layers if isinstance(lw.ffn, MoEWeights) for e in lw.ffn.experts]


def test_an_fp8_checkpoint_keeps_its_experts_e4m3_and_computes_what_its_dequantisation_does(pair):
    fp8, dequantised = pair
    a, b = load_model(fp8, dtype=torch.float32), load_model(dequantised, dtype=torch.float32)
    assert all(isinstance(e, QuantizedExpert) and e.format.name == "fp8" for e in routed(a))
    for q, d in zip(routed(a), routed(b)):
        back = q.dense()
        assert torch.equal(back.gate_FD, d.gate_FD) and torch.equal(back.up_FD, d.up_FD) and torch.equal(back.down_FD, d.down_FD)
    x, y = (generate(m, PROMPT, max_new_tokens=6, eos_ids=(), keep_logits=True) for m in (a, b))
    assert x.token_ids == y.token_ids and all(torch.equal(p, q) for p, q in zip(x.logits, y.logits))
    dense = load_model(fp8, dtype=torch.float32, expert_format=build_format("dense"))  # dequantised on load
    z = generate(dense, PROMPT, max_new_tokens=6, eos_ids=(), keep_logits=True)
    assert z.token_ids == y.token_ids and all(torch.equal(p, q) for p, q in zip(z.logits, y.logits))


@pytest.mark.parametrize("theta", [0.25, 1.0])
def test_offloaded_fp8_experts_change_no_bit(pair, theta):
    model = load_model(pair[0], dtype=torch.float32, widest_neuron_block=4)
    resident, trace = dense_run(model, PROMPT, 6)
    layout = plan_layout(model.spec, dtype_bytes=4, budget=1.0, theta=0.5, expert_format=build_format("fp8"))
    engine = offloaded_experts(model, layout.staging_bytes + layout.expert_bytes // 4, theta, policy=policy_for("lcp", trace))
    offloaded = generate(model, PROMPT, max_new_tokens=6, eos_ids=(), keep_logits=True, experts=engine)
    assert offloaded.token_ids == resident.token_ids and all(torch.equal(p, q) for p, q in zip(offloaded.logits, resident.logits))
    D = model.spec.hidden_size
    assert engine.layout.layers[0].neuron_bytes == 3 * D + 3 * -(-D // 128) * 4  # e4m3 codes and a scale per row


def _edit(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_or_misshapen_scale_and_an_unsupported_block_are_named(capsys, pair, tmp_path):
    fp8 = pair[0]
    argv = ["generate", "--prompt-ids", "1,2", "--max-new-tokens", "1", "--model"]
    name = next(n for n in load_file(fp8 / "model.safetensors") if n.endswith("self_attn.o_proj.weight"))
    missing = tmp_path / "missing"
    shutil.copytree(fp8, missing)
    _edit(missing, lambda t: t.pop(f"{name}_scale_inv"))
    assert cli_error(capsys, [*argv, str(missing)]) == (
        f"{missing / 'model.safetensors'}: FP8 tensor {name!r} has no scale tensor '{name}_scale_inv'")
    misshapen = tmp_path / "misshapen"
    shutil.copytree(fp8, misshapen)
    _edit(misshapen, lambda t: t.update({f"{name}_scale_inv": torch.ones(2, 2)}))
    assert cli_error(capsys, [*argv, str(misshapen)]).endswith(f"tensor '{name}_scale_inv' has shape [2, 2], expected [1, 1]")
    blocks = tmp_path / "blocks"
    shutil.copytree(fp8, blocks)
    config = json.loads((blocks / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (blocks / "config.json").write_text(json.dumps(config))
    assert cli_error(capsys, [*argv, str(blocks)]) == (
        f"{blocks / 'config.json'}: quantization_config.weight_block_size [64, 64] is not supported; "
        "FP8 weights are read in [128, 128] blocks")


def test_quantize_writes_fp8_experts_from_a_dense_checkpoint(checkpoint_dir, tmp_path):
    from moepic.cli import main

    out = tmp_path / "mixtral_fp8"
    assert main(["quantize", "--model", str(checkpoint_dir("mixtral")), "--format", "fp8", "--out", str(out)]) == 0
    model = load_model(out, dtype=torch.float32)
    dense = load_model(checkpoint_dir("mixtral"), dtype=torch.float32)
    assert all(isinstance(e, QuantizedExpert) and e.format.name == "fp8" for e in routed(model))
    for q, d in zip(routed(model), routed(dense)):  # e4m3: 3 mantissa bits, so within 1/16 of each row group's max
        back = q.dense()
        assert float((back.down_FD - d.down_FD).abs().max()) <= float(d.down_FD.abs().max()) / 16


@pytest.mark.parametrize("D", [96, 256])  # a partial last group of columns, and whole ones
def test_a_decode_is_codes_times_their_rows_scales_in_the_dtype(D):
    from moepic.core.weights import SwiGLUWeights

    g = torch.Generator().manual_seed(D)
    w = SwiGLUWeights.from_projections(torch.randn(32, D, generator=g), torch.randn(32, D, generator=g),
                                       torch.randn(D, 32, generator=g), block=8)
    q = build_format("fp8").encode(w)
    for dtype in (torch.float32, torch.bfloat16):
        got = q.format.decode(q, dtype)
        codes, scales = q.parts[3].reshape(32, D), q.parts[1].reshape(32, -1)  # down: e4m3 [F, D], float32 [F, ⌈D/128⌉]
        want = codes.to(dtype) * scales.to(dtype).repeat_interleave(128, dim=-1)[:, :D]
        assert torch.equal(got.down_FD, want)


def test_an_fp8_checkpoint_on_a_torch_without_float8_is_one_line(capsys, pair, monkeypatch):
    import moepic.checkpoint.load as load

    monkeypatch.setattr(load, "fp8_available", lambda: False)
    message = cli_error(capsys, ["generate", "--prompt-ids", "1,2", "--max-new-tokens", "1", "--model", str(pair[0])])
    assert message == (f"{pair[0] / 'config.json'}: an FP8 checkpoint needs a torch with float8 dtypes; "
                       f"this torch is {torch.__version__}")
