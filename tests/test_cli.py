"""The `moepic` command: happy paths on tiny checkpoints, and user mistakes as one `moepic: error:` line, exit 2.

Most cases call `moepic.cli.main(argv)` in-process; two run `python -m moepic` in a subprocess to prove
that no traceback (and no leftover progress bar) reaches a real stderr.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import moepic.checkpoint.load
from moepic import interrupts, progress
from moepic.cli import build_parser, main
from moepic.commands.arguments import shown_default
from moepic.commands.generate import generate_config
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
    return generate_config(build_parser().parse_args(["generate", *argv, *(["--config", str(yaml_path)] if yaml_path else [])]))


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
        ("sampling.top_p=2", "config key sampling.top_p: expected a number in (0, 1], got 2.0"),
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
            "generate: argument --prompt-ids: expected comma-separated integers, got '1,x'",
        ),
        (["--max-new-tokens", "x"], "generate: argument --max-new-tokens: expected an integer in [1, 1048576], got 'x'"),
        (["--seed", str(2**64)], f"generate: argument --seed: expected an integer in [0, {2**64 - 1}], got '{2**64}'"),
        (["--prompt-ids", ","], "the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flag_value_is_named(capsys, mixtral, argv, message):
    assert _error(capsys, ["generate", "--json", "--model", mixtral, *argv]) == message


def test_bare_moepic_prints_the_usage_with_every_command_and_exits_2(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: moepic")
    commands = [a for a in build_parser()._actions if a.dest == "command"][0].choices
    assert len(commands) >= 10
    assert all(f"\n    {name}" in err for name in commands)
    assert "error" not in err


def test_version_prints_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"moepic {version('moepic')}\n"


def test_a_parse_error_names_the_command_once_without_a_doubled_prefix(capsys):
    assert _error(capsys, ["inspect", "--dtype", "float8"]).startswith("inspect: argument --dtype: invalid choice: 'float8'")
    assert _error(capsys, ["--bogus"]) == "unrecognized arguments: --bogus"


def _subparsers() -> dict:
    return [a for a in build_parser()._actions if a.dest == "command"][0].choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_of_every_command_shows_defaults_and_never_none(command):
    parser = _subparsers()[command]
    text = parser.format_help()
    assert "(default: None)" not in text
    for action in parser._actions:
        default = shown_default(action)
        if action.help and action.option_strings and default not in (None, False, [], "==SUPPRESS==") and "default" not in action.help:
            assert f"(default: {default})" in " ".join(text.split()), f"{command} {action.option_strings[0]}"


def test_generate_help_shows_the_config_defaults_of_its_override_flags():
    text = " ".join(_subparsers()["generate"].format_help().split())  # unwrapped
    defaults = RunConfig()
    assert f"tokens to generate after the prompt (default: {defaults.generate.max_new_tokens})" in text
    assert f"sampling temperature (default: {defaults.sampling.temperature})" in text
    assert f"(default: {defaults.sampling.top_p})" in text
    assert f"cpu, cuda, cuda:1 … (default: {defaults.model.device})" in text


@pytest.mark.parametrize("progress_flag", [[], ["--progress"]], ids=["not-a-terminal", "--progress"])
def test_bars_show_only_on_a_terminal_or_with_progress(capsys, mixtral, progress_flag):
    argv = ["generate", "--greedy", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--model", mixtral]
    capsys.readouterr()
    assert main([*argv, *progress_flag]) == 0
    err = capsys.readouterr().err
    assert ("loading layers" in err) == bool(progress_flag)
    assert ("\r" in err) == bool(progress_flag)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@given(terminal=st.booleans(), forced=st.booleans(), wanted=st.booleans())
def test_a_bar_is_shown_exactly_when_wanted_and_on_a_terminal_or_forced(terminal, forced, wanted):
    stream = _Terminal() if terminal else io.StringIO()
    with mock.patch.object(sys, "stderr", stream):
        progress.force(forced)
        try:
            assert progress.shown(wanted) == (wanted and (terminal or forced))
            with progress.bar(total=2, wanted=wanted, leave=False) as bar:
                bar.update(1)
        finally:
            progress.force(False)
    assert bool(stream.getvalue()) == (wanted and (terminal or forced))


def test_end_line_closes_a_bar_left_open_so_the_next_line_starts_in_column_0():
    stream = _Terminal()
    with mock.patch.object(sys, "stderr", stream):
        bar = progress.bar(total=5, desc="working", leave=False)  # an exception would leave it open
        bar.update(2)
        bar.refresh()
        assert not stream.getvalue().endswith(("\r", "\n"))  # a bar being drawn
        progress.end_line()
    assert stream.getvalue().endswith("\r")  # tqdm cleared it and went back to column 0
    assert bar.disable  # closed


@pytest.mark.parametrize(("interrupt", "code", "line"), [
    (KeyboardInterrupt, 130, "moepic: interrupted"), (interrupts.Terminated, 143, "moepic: terminated")
])
def test_an_interrupt_exits_with_its_code_and_one_line(capsys, monkeypatch, interrupt, code, line):
    def interrupted(*args, **kwargs):
        raise interrupt()

    monkeypatch.setattr("moepic.commands.inspect.run_inspect", interrupted)
    before = signal.getsignal(signal.SIGINT)
    assert main(["inspect"]) == code
    assert capsys.readouterr() == ("", line + "\n")
    assert signal.getsignal(signal.SIGINT) is before  # no signal came: the caller's handlers are back


def test_text_streamed_before_an_interrupt_ends_its_line_so_the_message_starts_one(capsys, monkeypatch):
    def cut_short(*args, on_token, **kwargs):
        for token in (5, 6, 7):
            on_token(token)
        raise KeyboardInterrupt

    monkeypatch.setattr("moepic.runtime.generation.generate", cut_short)
    assert main(["generate", "--prompt-ids", "1,2", "--max-new-tokens", "4"]) == 130
    out, err = capsys.readouterr()
    assert out.endswith("\n") and out.count("\n") == 1 and len(out) > 1  # the streamed text, then one newline
    assert err == "moepic: interrupted\n"


def test_an_error_that_is_not_the_users_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("moepic.commands.inspect.run_inspect", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect"])


@pytest.mark.parametrize(("token", "message"), [
    (96, "prompt token id 96 is outside the vocabulary [0, 96)"),
    (-1, "config key generate.prompt_ids[1]: expected an integer in [0, 2147483647], got -1"),
])
def test_prompt_id_outside_the_vocabulary_is_named(capsys, mixtral, token, message):
    assert _error(capsys, ["generate", "--json", "--model", mixtral, "--prompt-ids", f"1,{token}"]) == message


def test_run_longer_than_the_context_is_named(capsys, mixtral):
    # Within max_new_tokens' own range, but not the model's: the KV cache would fail allocating.
    assert _error(capsys, [*GREEDY, "--model", mixtral, "generate.max_new_tokens=100000"]) == (
        "prompt (3 tokens) + generate.max_new_tokens (100000) = 100003 exceeds the model's max_position_embeddings (256)"
    )
    assert _error(capsys, [*GREEDY, "--model", mixtral, "generate.max_new_tokens=100000000000"]) == (
        "config key generate.max_new_tokens: expected an integer in [1, 1048576], got 100000000000"
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


@pytest.mark.parametrize("progress_flag", [[], ["--progress"]], ids=["pipe", "bar-forced"])
def test_process_failing_mid_load_clears_the_progress_bar_before_the_error(checkpoint_dir, tmp_path, progress_flag):
    # Without --json, with --progress, the loader draws a bar on stderr; the error must not be glued to it.
    folder = tmp_path / "mixtral"
    shutil.copytree(checkpoint_dir("mixtral"), folder)
    name = "model.layers.2.self_attn.q_proj.weight"
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = torch.zeros(32, 31)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    proc = _moepic("generate", "--prompt-ids", "1,2", "--model", str(folder), *progress_flag, cache=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert ("loading layers" in proc.stderr) == bool(progress_flag)
    assert proc.stderr.count("\n") == 1
    # What a terminal shows: the text after the last carriage return.
    assert proc.stderr.split("\r")[-1] == (
        f"moepic: error: {folder / 'model.safetensors'}: tensor {name!r} has shape [32, 31], expected [32, 32]\n"
    )
