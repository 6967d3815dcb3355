"""The generation loop: stopping rules, seeded sampling, stats."""

from __future__ import annotations

import pytest
import torch

from moepic.checkpoint.load import load_model
from moepic.config import SamplingConfig
from moepic.runtime.generation import generate

PROMPT = [1, 17, 5, 42, 8]


@pytest.fixture(scope="module")
def mixtral(checkpoint_dir):
    return load_model(checkpoint_dir("mixtral"), dtype=torch.float32)


def test_stops_right_after_emitting_an_eos_token(mixtral):
    free = generate(mixtral, PROMPT, max_new_tokens=8, eos_ids=())
    eos = free.token_ids[3]
    stopped = generate(mixtral, PROMPT, max_new_tokens=8, eos_ids=(eos,))
    first = free.token_ids.index(eos)
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.stopped_on_eos
    assert not free.stopped_on_eos or free.token_ids[-1] == eos


def test_stops_at_max_new_tokens(mixtral):
    result = generate(mixtral, PROMPT, max_new_tokens=5, eos_ids=())
    assert len(result.token_ids) == 5 == result.stats.tokens
    assert result.stats.prompt_tokens == len(PROMPT)
    assert result.stats.prefill_s > 0 and result.stats.decode_s > 0
    assert result.stats.decode_s_per_token == pytest.approx(result.stats.decode_s / 4)


def test_seeded_sampling_reproduces_and_seeds_differ(mixtral):
    def run(seed):
        sampling = SamplingConfig(greedy=False, temperature=1.5, top_p=1.0, seed=seed)
        return generate(mixtral, PROMPT, max_new_tokens=12, eos_ids=(), sampling=sampling).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_greedy_ignores_the_seed(mixtral):
    a = generate(mixtral, PROMPT, max_new_tokens=6, eos_ids=(), sampling=SamplingConfig(greedy=True, seed=1))
    b = generate(mixtral, PROMPT, max_new_tokens=6, eos_ids=(), sampling=SamplingConfig(greedy=True, seed=2))
    assert a.token_ids == b.token_ids


def test_kept_logits_choose_the_greedy_tokens(mixtral):
    result = generate(mixtral, PROMPT, max_new_tokens=4, eos_ids=(), keep_logits=True)
    assert [int(l.argmax()) for l in result.logits] == result.token_ids


@pytest.mark.parametrize("prompt,max_new", [([], 3), (PROMPT, 0)])
def test_empty_prompt_or_zero_tokens_is_rejected(mixtral, prompt, max_new):
    with pytest.raises(ValueError):
        generate(mixtral, prompt, max_new_tokens=max_new)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_runs_in_that_dtype_and_stays_close_to_fp32(checkpoint_dir, dtype):
    folder = checkpoint_dir("mixtral")
    fp32 = load_model(folder, dtype=torch.float32)
    half = load_model(folder, dtype=dtype)
    assert half.dtype == dtype
    a = generate(fp32, PROMPT, max_new_tokens=3, eos_ids=(), keep_logits=True)
    b = generate(half, PROMPT, max_new_tokens=3, eos_ids=(), keep_logits=True)
    assert b.logits[0].dtype == dtype
    torch.testing.assert_close(b.logits[0].float(), a.logits[0], atol=0.1, rtol=0)


def test_generation_config_eos_ids_are_the_stop_tokens(checkpoint_dir, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(checkpoint_dir("mixtral"), tmp_path / "m")
    assert load_model(folder).spec.eos_token_ids == (2,)  # what save_pretrained wrote in both files
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    model = load_model(folder, dtype=torch.float32)
    assert model.spec.eos_token_ids == (2, 7)
    free = generate(model, PROMPT, max_new_tokens=8, eos_ids=())
    stop = free.token_ids[2]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    stopped = generate(load_model(folder, dtype=torch.float32), PROMPT, max_new_tokens=8)
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop) + 1] and stopped.stopped_on_eos
