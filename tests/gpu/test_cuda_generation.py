"""The same core on a CUDA device: loading to the GPU, and the same tokens as on the CPU."""

from __future__ import annotations

import pytest
import torch

from moepic.checkpoint.load import load_model
from moepic.runtime.generation import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = [1, 17, 5, 42, 8, 77, 3]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss_mxfp4", "phimoe",
                                  "llama4", "hunyuan_v1_moe", "flex_olmo", "granitemoe"])
def test_cuda_generation_matches_cpu(checkpoint_dir, name):
    folder = checkpoint_dir(name)
    cpu = load_model(folder, dtype=torch.float32)
    gpu = load_model(folder, dtype=torch.float32, device="cuda")
    assert gpu.device.type == "cuda" and gpu.weights.layers[-1].post_attention_norm_D.is_cuda  # (MLA has no q_QD)
    a = generate(cpu, PROMPT, max_new_tokens=8, eos_ids=(), keep_logits=True)
    b = generate(gpu, PROMPT, max_new_tokens=8, eos_ids=(), keep_logits=True)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(y.cpu(), x, atol=1e-4, rtol=0)


def test_bf16_on_cuda_runs_and_stays_close_to_fp32(checkpoint_dir):
    folder = checkpoint_dir("mixtral")
    fp32 = load_model(folder, dtype=torch.float32, device="cuda")
    bf16 = load_model(folder, dtype=torch.bfloat16, device="cuda")
    a = generate(fp32, PROMPT, max_new_tokens=2, eos_ids=(), keep_logits=True)
    b = generate(bf16, PROMPT, max_new_tokens=2, eos_ids=(), keep_logits=True)
    torch.testing.assert_close(b.logits[0].float(), a.logits[0], atol=0.1, rtol=0)
