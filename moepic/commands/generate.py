"""`moepic generate`: load a model, generate (streaming text to stdout), optionally record a trace.

Its flags are spelled as config overrides (`FLAG_KEYS`), so one validation path serves YAML, flags
and key=value alike. Side effects: reads the model, streams text, writes the trace and token log.
"""

from __future__ import annotations

import argparse

from moepic.commands import arguments, run_setup
from moepic.commands.run_setup import RUN_FLAG_KEYS, key_range
from moepic.errors import ConfigError

NAME = "generate"
HELP = "generate text from a prompt"
TEXT_ON_STDERR = True  # the generated text streams to stdout; the report is a timing line beside it

DEFAULT_PROMPT = "And God said"

# Each flag's config key: the model and cache flags `moepic serve` shares, and generate's own.
FLAG_KEYS = RUN_FLAG_KEYS | {
    "prompt": "generate.prompt",
    "prompt_ids": "generate.prompt_ids",
    "max_new_tokens": "generate.max_new_tokens",
    "greedy": "sampling.greedy",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "seed": "sampling.seed",
    "record_trace": "generate.record_trace",
    "trace_hidden": "generate.trace_hidden",
    "token_log": "generate.token_log",
}

def _prompt_ids(text: str) -> str:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return "[" + ",".join(map(str, ids)) + "]"


def add_parser(subparsers) -> argparse.ArgumentParser:
    gen = subparsers.add_parser(NAME, help=HELP)
    gen.add_argument("--config", help="YAML run config (keys as in moepic/config.py)")
    arguments.add_model(gen, shape=False)
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer: tokenizer.json, or a GGUF file's own)")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt as token ids: 1,2,3")
    gen.add_argument("--max-new-tokens", type=key_range("GenerateConfig", "max_new_tokens"), help="tokens to generate after the prompt")
    gen.add_argument("--greedy", action="store_true", default=None, help="argmax decoding (default: sampling)")
    gen.add_argument("--temperature", type=key_range("SamplingConfig", "temperature"), help="sampling temperature")
    gen.add_argument("--top-p", type=key_range("SamplingConfig", "top_p"), help="sample from the most likely tokens holding this much probability")
    gen.add_argument("--seed", type=key_range("SamplingConfig", "seed"), help="sampling seed")
    run_setup.add_engine_flags(gen)
    arguments.add_json(gen)
    gen.add_argument("--record-trace", metavar="FILE.npz", help="save every token's routing to this file")
    gen.add_argument("--trace-hidden", action="store_true", default=None, help="include router inputs in the trace")
    gen.add_argument("--token-log", metavar="FILE.jsonl", help="offloaded runs: one JSON line per token (latency, copies)")
    run_setup.add_config_tail(gen, FLAG_KEYS)
    return gen


def generate_config(args: argparse.Namespace):
    """defaults ← --config YAML ← flags ← key=value overrides (run_setup.run_config)."""
    return run_setup.run_config(args, FLAG_KEYS)


def _check_every_key_takes_effect(cfg) -> None:
    """A key the chosen mode ignores is an error, never silently dropped: the user meant something by it."""
    run_setup.check_cache_keys_take_effect(cfg, FLAG_KEYS)
    named = lambda key: run_setup.flag_named(key, FLAG_KEYS)  # noqa: E731
    if cfg.cache.budget is None and cfg.generate.token_log is not None:
        raise ConfigError(f"{named('generate.token_log')} has no effect without cache.budget (--budget): the dense run "
                          "keeps every expert on the device; give a budget to offload, or leave it out")
    if cfg.generate.trace_hidden and cfg.generate.record_trace is None:
        raise ConfigError(f"{named('generate.trace_hidden')} has no effect without generate.record_trace (--record-trace FILE.npz)")


def run(args: argparse.Namespace) -> dict:
    arguments.refuse_preset(args.model, NAME)  # a preset name is no folder: say that weights are needed
    return run_generate(generate_config(args), as_json=args.json)


def text(report: dict) -> str:
    stats = report["stats"]
    cache = ""
    if "expert_hit_rate" in stats:
        cache = (
            f" · {report['cache']['policy']['name']} hit rate {stats['decode_expert_hit_rate']:.1%} · "
            f"{stats['decode_bytes_loaded_per_token'] / 2**20:.2f} MiB/token loaded · "
            f"exposed copies {stats['decode_exposed_copy_s_per_token'] * 1e3:.2f} ms/token"
        )
        if stats["miss_fill_bytes"]:  # misses served low-bit: the cache's full-precision tops, copied behind
            cache += f" · {stats['miss_fill_bytes'] / 2**20:.2f} MiB of tops filled"
        if stats["prediction_recall"] is not None:
            cache += f" · {report['cache']['predictor']['name']} recall {stats['prediction_recall']:.1%}"
        if report["cache"].get("hybrid", "off") != "off":
            cache += (
                f" · host computed {stats['host_experts']} experts + {stats['host_bottoms']} bottoms "
                f"+ {stats['host_splits']} split misses' bottoms, "
                f"{stats['decode_host_s_per_token'] * 1e3:.2f} ms/token busy"
            )
    return (
        f"[{stats['tokens']} tokens · prefill {stats['prefill_s'] * 1e3:.1f} ms · "
        f"decode {stats['decode_s_per_token'] * 1e3:.2f} ms/token{cache}]"
    )


def _stdout_streamer(codec):
    """(on_token, finish) that print the new text as it is generated (token ids without a tokenizer)."""
    from moepic.progress import stream as show
    from moepic.tokenizer import IncrementalDecoder

    if codec is None:
        return (lambda token: show(f"{token} ")), (lambda: show("\n"))
    decoder = IncrementalDecoder(codec)
    return (lambda token: show(decoder.push(token))), (lambda: show(decoder.flush() + "\n"))


def run_generate(cfg, *, as_json: bool) -> dict:
    """Load, generate, and return the report; streams the text to stdout unless `as_json`."""
    from moepic.outputs import PendingOutput, check_writable
    from moepic.checkpoint.load import read_spec
    from moepic.default_model import model_folder
    from moepic.runtime.generation import generate
    from moepic.tokenizer import TextCodec, no_tokenizer

    _check_every_key_takes_effect(cfg)
    folder = model_folder(cfg.model.path)
    run_setup.check_device(cfg)
    trace_path = cfg.generate.record_trace
    if trace_path is not None:
        check_writable(trace_path, "trace")  # before loading and generating, not after
    log_path = cfg.generate.token_log
    if log_path is not None:
        check_writable(log_path, "token log")
    codec = TextCodec.from_folder(folder)
    if cfg.generate.prompt_ids is not None:
        prompt_ids = list(cfg.generate.prompt_ids)
    else:
        if codec is None:
            raise ConfigError(f"{no_tokenizer(folder)}: give the prompt as --prompt-ids 1,2,3")
        prompt_ids = codec.encode(DEFAULT_PROMPT if cfg.generate.prompt is None else cfg.generate.prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    spec, _ = read_spec(folder)  # config.json alone: the checks below come before loading the weights
    # The KV cache is sized for the whole run up front, so a huge max_new_tokens would fail allocating it.
    length, limit = len(prompt_ids) + cfg.generate.max_new_tokens, spec.max_position_embeddings
    if length > limit:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + generate.max_new_tokens ({cfg.generate.max_new_tokens}) = {length} "
            f"exceeds the model's max_position_embeddings ({limit})"
        )
    bad = [i for i in prompt_ids if not 0 <= i < spec.vocab_size]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {spec.vocab_size})")
    model, experts = run_setup.load_engine(cfg, folder, progress=not as_json)
    if experts is not None:
        from moepic.policies.own_future import check_run_prompt

        check_run_prompt((experts.policy, experts.predictor), len(prompt_ids))  # belady's, an oracle's trace
    on_token, finish = (None, None) if as_json else _stdout_streamer(codec)
    log_file = None
    if log_path is not None:
        from moepic.runtime.token_log import TokenLog

        log_file = PendingOutput(log_path, "token log", text=True)  # renamed to log_path once generation completes
        log, show = TokenLog(log_file, experts), on_token
        on_token = log if show is None else (lambda token: (log(token), show(token)))
    recorder = None
    if trace_path is not None:
        from moepic.tracing import save_trace
        from moepic.tracing.recorder import RoutingRecorder

        recorder = RoutingRecorder(model.spec, model_name=folder, record_hidden=cfg.generate.trace_hidden)
    # The streamed text is the progress display; a bar would interleave with it.
    try:
        result = generate(
            model,
            prompt_ids,
            max_new_tokens=cfg.generate.max_new_tokens,
            sampling=cfg.sampling,
            on_token=on_token,
            tap=recorder,
            experts=experts,
        )
    except BaseException:
        if log_file is not None:
            log_file.discard()  # an interrupted or failed run leaves no partial log, an older one intact
        raise
    if log_file is not None:
        log_file.commit()
    if finish is not None:
        finish()
    if recorder is not None:
        save_trace(recorder.trace(), trace_path)  # all or nothing (moepic.outputs)
    report = {"model": folder, "prompt_ids": prompt_ids, "token_ids": result.token_ids}
    if codec is not None:
        report["text"] = codec.decode(result.token_ids)
    report["stopped_on_eos"] = result.stopped_on_eos
    report["stats"] = result.stats.as_dict()
    if experts is not None:
        report["cache"] = {
            "policy": cfg.cache.policy.as_dict(), "predictor": cfg.cache.predictor.as_dict(), "budget": cfg.cache.budget,
            "hybrid": cfg.cache.hybrid,
        }
        report["stats"] |= experts.report()
        experts.close()
    return report
