"""The `moepic` command: happy paths on tiny checkpoints, and user mistakes as one `moepic: error:` line, exit 2.

Most cases call `moepic.cli.main(argv)` in-process; two run `python -m moepic` in a subprocess to prove
that no traceback (and no leftover progress bar) reaches a real stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import moepic.checkpoint.load
from moepic.cli import _parser, generate_config, main
from moepic.config import RunConfig, SamplingConfig
from moepic.default_model import default_model_dir
from moepic.policies.lcp import LCPConfig
from moepic.policies.lru import LRUConfig
from moepic.policies.random import RandomConfig
from moepic.tokenizer import TextCodec
from tests_support import cli_error

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]


@pytest.fixture
def mixtral(checkpoint_dir):
    return str(checkpoint_dir("mixtral"))


def _run(capsys, argv) -> dict:
    """main(argv) must succeed and print exactly one JSON object on stdout; return it."""
    capsys.readouterr()  # drop what building a fixture checkpoint printed
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out
    return json.loads(out)


_error = cli_error


# --- happy paths ---------------------------------------------------------------------------------------


def test_json_output_is_one_object_with_tokens_and_stats(capsys, mixtral):
    report = _run(capsys, [*GREEDY, "--model", mixtral])
    assert report["prompt_ids"] == [1, 2, 3]
    ids = report["token_ids"]
    assert all(isinstance(i, int) and 0 <= i < 96 for i in ids)
    assert len(ids) == 4 or (report["stopped_on_eos"] and ids[-1] == 2)
    stats = report["stats"]
    assert {"tokens", "prefill_s", "decode_s_per_token"} <= set(stats)
    assert stats["tokens"] == len(ids)
    assert stats["prefill_s"] > 0 and stats["decode_s_per_token"] >= 0
    assert "text" not in report  # the fixture folder has no tokenizer.json


def test_greedy_output_is_the_same_on_every_run(capsys, mixtral):
    first = _run(capsys, [*GREEDY, "--model", mixtral])["token_ids"]
    assert _run(capsys, [*GREEDY, "--model", mixtral])["token_ids"] == first


def _sampled(capsys, model, seed):
    argv = ["generate", "--json", "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--seed", str(seed)]
    return _run(capsys, [*argv, "--temperature", "1.5", "--model", model])["token_ids"]


def test_seeded_sampling_repeats_with_the_same_seed_and_varies_across_seeds(capsys, mixtral):
    first = _sampled(capsys, mixtral, 3)
    assert _sampled(capsys, mixtral, 3) == first
    # Without this the test would pass if --seed were ignored and decoding were greedy.
    assert {tuple(_sampled(capsys, mixtral, seed)) for seed in (0, 1)} != {tuple(first)}


def test_default_model_turns_a_text_prompt_into_text(capsys):
    report = _run(capsys, ["generate", "--json", "--prompt", "And God said", "--max-new-tokens", "3"])
    folder = default_model_dir()
    assert report["model"] == str(folder)
    codec = TextCodec.from_folder(folder)
    assert report["prompt_ids"] == codec.encode("And God said")
    assert isinstance(report["text"], str)
    assert report["text"] == codec.decode(report["token_ids"])


def test_prompt_text_with_braces_quotes_and_emoji_reaches_the_tokenizer_verbatim(capsys):
    text = 'cost ${x} \\${y} "q" 😀\n'
    report = _run(capsys, ["generate", "--json", "--prompt", text, "--max-new-tokens", "1", "--greedy"])
    assert report["prompt_ids"] == TextCodec.from_folder(default_model_dir()).encode(text)


def test_plain_output_prints_text_on_stdout_and_stats_on_stderr(capsys):
    capsys.readouterr()
    assert main(["generate", "--prompt", "And God said", "--max-new-tokens", "2", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1
    assert err.rstrip().split("\r")[-1].startswith("[2 tokens · prefill ")


def test_plain_output_streams_exactly_the_decoded_text(capsys):
    argv = ["generate", "--prompt", "And God said", "--max-new-tokens", "12", "--greedy"]
    report = _run(capsys, [*argv, "--json"])
    assert main(argv) == 0
    assert capsys.readouterr().out == report["text"] + "\n"


def test_plain_output_without_a_tokenizer_streams_the_token_ids(capsys, mixtral):
    report = _run(capsys, [*GREEDY, "--model", mixtral])
    assert main([a for a in GREEDY if a != "--json"] + ["--model", mixtral]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in report["token_ids"]]


def test_dtype_flag_loads_the_weights_in_that_dtype(capsys, mixtral, monkeypatch):
    loaded = []
    real = moepic.checkpoint.load.load_model

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(moepic.checkpoint.load, "load_model", spy)
    report = _run(capsys, [*GREEDY, "--dtype", "bfloat16", "--model", mixtral])
    assert [m.dtype for m in loaded] == [torch.bfloat16]
    assert len(report["token_ids"]) == 4 or report["stopped_on_eos"]


def test_yaml_config_file_drives_the_run(capsys, mixtral, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{path: {mixtral}}}\ngenerate: {{prompt_ids: [1, 2, 3], max_new_tokens: 4}}\n")
    from_yaml = _run(capsys, ["generate", "--json", "--greedy", "--config", str(path)])
    assert from_yaml["model"] == mixtral
    assert from_yaml["token_ids"] == _run(capsys, [*GREEDY, "--model", mixtral])["token_ids"]


# --- flags → config -----------------------------------------------------------------------------------


def _config(argv, yaml_path=None) -> RunConfig:
    return generate_config(_parser().parse_args(["generate", *argv, *(["--config", str(yaml_path)] if yaml_path else [])]))


def test_every_flag_sets_its_config_key():
    cfg = _config(
        "--model /m --dtype float16 --device cpu:0 --prompt-ids 5,6 --max-new-tokens 9 "
        "--greedy --temperature 0.5 --top-p 0.7 --seed 11 --budget 512MiB --theta 0.3 --policy lru".split()
    )
    assert (cfg.model.path, cfg.model.dtype, cfg.model.device) == ("/m", "float16", "cpu:0")
    assert (cfg.generate.prompt_ids, cfg.generate.max_new_tokens) == ((5, 6), 9)
    assert cfg.sampling == SamplingConfig(greedy=True, temperature=0.5, top_p=0.7, seed=11)
    assert (cfg.cache.budget, cfg.cache.theta, cfg.cache.policy) == ("512MiB", 0.3, LRUConfig())


def test_per_layer_budget_and_theta_flags_become_lists():
    cfg = _config(["--budget", "0.25,1GiB,0.5", "--theta", "0.2,0.4,1"])
    assert (cfg.cache.budget, cfg.cache.theta) == (("0.25", "1GiB", "0.5"), (0.2, 0.4, 1.0))


def test_policy_flag_replaces_the_yaml_policy_node_instead_of_merging_into_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("cache: {budget: 0.5, policy: {name: lcp, rho: 0.5}}\n")
    assert _config([], path).cache.policy == LCPConfig(rho=0.5)
    assert _config(["--policy", "random"], path).cache.policy == RandomConfig()
    assert _config(["--policy", "random", "cache.policy.seed=4"], path).cache.policy == RandomConfig(seed=4)


def test_policy_keys_without_a_name_tune_the_default_policy():
    assert _config(["cache.policy.window=64"]).cache.policy == LCPConfig(window=64)


def test_no_flags_leave_the_defaults():
    assert _config([]) == RunConfig()


def test_flags_beat_yaml_and_key_value_overrides_beat_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sampling: {seed: 1, top_p: 0.5}\n")
    cfg = _config(["--seed", "2", "--top-p", "0.6", "sampling.top_p=0.7"], path)
    assert (cfg.sampling.seed, cfg.sampling.top_p) == (2, 0.7)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_prompt_flag_text_reaches_the_config_verbatim(text):
    # OmegaConf would otherwise resolve `${...}` and YAML would reject some characters.
    assert _config(["--prompt", text]).generate.prompt == text


# --- user mistakes ------------------------------------------------------------------------------------


def test_bad_yaml_syntax_names_the_file(capsys, mixtral, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("generate: [1, {\n")
    assert _error(capsys, [*GREEDY, "--model", mixtral, "--config", str(path)]).startswith(f"{path}: not valid YAML (")


def test_unknown_yaml_key_is_named_with_the_file_and_the_known_keys(capsys, mixtral, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("generate: {max_tokens: 3}\n")
    assert _error(capsys, [*GREEDY, "--model", mixtral, "--config", str(path)]) == (
        f"{path}: unknown config key generate.max_tokens; known keys here: "
        "max_new_tokens, prompt, prompt_ids, record_trace, token_log, trace_hidden"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generate.max_new_tokens=abc", "config key generate.max_new_tokens: expected int, got 'abc'"),
        ("sampling.top_p=2", "sampling.top_p must be in (0, 1], got 2.0"),
        ("generate.max_new_tokens", "override 'generate.max_new_tokens': expected key=value (e.g. sampling.seed=3)"),
    ],
)
def test_bad_override_is_named(capsys, mixtral, override, message):
    assert _error(capsys, [*GREEDY, "--model", mixtral, override]) == message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--prompt-ids", "1,x"],
            "moepic generate: argument --prompt-ids: expected comma-separated integers, got '1,x'",
        ),
        (["--max-new-tokens", "x"], "moepic generate: argument --max-new-tokens: invalid int value: 'x'"),
        (["--seed", str(2**64)], f"sampling.seed must be in [0, 2**64), got {2**64}"),
        (["--prompt-ids", ","], "the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3"),
        (["--bogus"], "moepic: unrecognized arguments: --bogus"),
    ],
)
def test_bad_flag_value_is_named(capsys, mixtral, argv, message):
    assert _error(capsys, ["generate", "--json", "--model", mixtral, *argv]) == message


def test_missing_subcommand_is_named(capsys):
    assert _error(capsys, []) == "moepic: the following arguments are required: command"


@pytest.mark.parametrize("token", [96, -1])
def test_prompt_id_outside_the_vocabulary_is_named(capsys, mixtral, token):
    assert _error(capsys, ["generate", "--json", "--model", mixtral, "--prompt-ids", f"1,{token}"]) == (
        f"prompt token id {token} is outside the vocabulary [0, 96)"
    )


def test_run_longer_than_the_context_is_named(capsys, mixtral):
    # 100 billion tokens would otherwise fail allocating the KV cache, with a traceback.
    assert _error(capsys, [*GREEDY, "--model", mixtral, "generate.max_new_tokens=100000000000"]) == (
        "prompt (3 tokens) + generate.max_new_tokens (100000000000) = 100000000003 "
        "exceeds the model's max_position_embeddings (256)"
    )


def test_run_that_fills_the_context_exactly_is_allowed(capsys, mixtral):
    prompt = ",".join(["5"] * 252)
    argv = ["generate", "--json", "--greedy", "--model", mixtral, "--max-new-tokens", "4"]
    report = _run(capsys, [*argv, "--prompt-ids", prompt])
    assert len(report["prompt_ids"]) + len(report["token_ids"]) == 256 or report["stopped_on_eos"]
    assert _error(capsys, [*argv, "--prompt-ids", prompt + ",5"]).startswith("prompt (253 tokens) + ")


@pytest.mark.parametrize("prompt", [["--prompt", "hello"], []], ids=["text", "default-prompt"])
def test_text_prompt_for_a_folder_without_tokenizer_asks_for_ids(capsys, mixtral, prompt):
    assert _error(capsys, ["generate", "--json", "--model", mixtral, *prompt]) == (
        f"{mixtral} has no tokenizer.json: give the prompt as --prompt-ids 1,2,3"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_named(capsys, mixtral):
    assert _error(capsys, [*GREEDY, "--model", mixtral, "--device", "cuda"]) == (
        "model.device is 'cuda', but CUDA is not available on this machine"
    )


def test_device_that_torch_does_not_know_is_named(capsys, mixtral):
    assert _error(capsys, [*GREEDY, "--model", mixtral, "--device", "tpu"]) == (
        "model.device 'tpu' is not a device (cpu, cuda, cuda:1, ...)"
    )


# --- a real process: no traceback reaches stderr ------------------------------------------------------


def _moepic(*argv: str, cache: Path) -> subprocess.CompletedProcess:
    """`python -m moepic ARGV`; stdout and stderr decoded as is (text=True would turn `\\r` into `\\n`)."""
    env = os.environ | {"MOEPIC_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "moepic", *argv], cwd=REPO, env=env, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_process_with_a_missing_model_folder_prints_one_line_and_exits_2(tmp_path):
    missing = tmp_path / "nowhere"
    proc = _moepic("generate", "--prompt-ids", "1,2", "--model", str(missing), cache=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"moepic: error: {missing}: model folder not found\n"


def test_process_failing_mid_load_clears_the_progress_bar_before_the_error(checkpoint_dir, tmp_path):
    # Without --json the loader shows a progress bar on stderr; the error must not be glued to it.
    folder = tmp_path / "mixtral"
    shutil.copytree(checkpoint_dir("mixtral"), folder)
    name = "model.layers.2.self_attn.q_proj.weight"
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = torch.zeros(32, 31)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    proc = _moepic("generate", "--prompt-ids", "1,2", "--model", str(folder), cache=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    # What a terminal shows: the text after the last carriage return.
    assert proc.stderr.split("\r")[-1] == (
        f"moepic: error: {folder / 'model.safetensors'}: tensor {name!r} has shape [32, 31], expected [32, 32]\n"
    )
