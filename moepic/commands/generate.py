"""`moepic generate`: load a model, generate (streaming text to stdout), optionally record a trace."""

from __future__ import annotations

import sys

import attrs
import torch

from moepic.checkpoint.hf_config import DTYPES
from moepic.config import RunConfig
from moepic.errors import ConfigError
from moepic.outputs import PendingOutput, check_writable

DEFAULT_PROMPT = "And God said"


def _stdout_streamer(codec):
    """(on_token, finish) that print the new text as it is generated (token ids without a tokenizer)."""
    from moepic.progress import stream as show
    from moepic.tokenizer import IncrementalDecoder

    if codec is None:
        return (lambda token: show(f"{token} ")), (lambda: show("\n"))
    decoder = IncrementalDecoder(codec)
    return (lambda token: show(decoder.push(token))), (lambda: show(decoder.flush() + "\n"))


def _link(cfg: RunConfig, device: torch.device):
    from moepic.runtime.copy_engine import Link

    if cfg.cache.link_gbps is None:
        return None
    if device.type == "cuda":
        raise ConfigError("cache.link_gbps emulates a link for CPU runs; on CUDA the real link is used")
    return Link(gbps=cfg.cache.link_gbps, latency_us=cfg.cache.link_latency_us)


def _check_every_key_takes_effect(cfg: RunConfig) -> None:
    """A key the chosen mode ignores is an error, never silently dropped: the user meant something by it."""
    from moepic.cli import _FLAG_KEYS
    from moepic.config import CacheConfig

    def named(key: str) -> str:
        flags = [f"--{flag.replace('_', '-')}" for flag, k in _FLAG_KEYS.items() if k.split(".")[:2] == key.split(".")]
        return f"{key} ({flags[0]})" if flags else key

    if cfg.cache.budget is None:
        dense = CacheConfig()
        ignored = [f"cache.{f.name}" for f in attrs.fields(CacheConfig) if getattr(cfg.cache, f.name) != getattr(dense, f.name)]
        ignored += ["generate.token_log"] if cfg.generate.token_log is not None else []
        if ignored:
            raise ConfigError(
                f"{named(ignored[0])} has no effect without cache.budget (--budget): the dense run keeps every expert "
                "on the device; give a budget to offload, or leave it out"
            )
    if cfg.cache.link_latency_us and cfg.cache.link_gbps is None:
        raise ConfigError(f"{named('cache.link_latency_us')} has no effect without cache.link_gbps (--link-gbps): no link is emulated")
    if cfg.generate.trace_hidden and cfg.generate.record_trace is None:
        raise ConfigError(f"{named('generate.trace_hidden')} has no effect without generate.record_trace (--record-trace FILE.npz)")


def run_generate(cfg: RunConfig, *, as_json: bool) -> dict:
    """Load, generate, and return the report; streams the text to stdout unless `as_json`."""
    from moepic.checkpoint.load import load_model, read_spec
    from moepic.default_model import model_folder
    from moepic.runtime.generation import generate
    from moepic.tokenizer import TextCodec

    _check_every_key_takes_effect(cfg)
    folder = model_folder(cfg.model.path)
    try:
        torch.device(cfg.model.device)
    except RuntimeError:
        raise ConfigError(f"model.device {cfg.model.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {cfg.model.device!r}, but CUDA is not available on this machine")
    trace_path = cfg.generate.record_trace
    if trace_path is not None:
        check_writable(trace_path, "trace")  # before loading and generating, not after
    log_path = cfg.generate.token_log
    if log_path is not None:
        check_writable(log_path, "token log")
    dtype = None if cfg.model.dtype == "auto" else DTYPES[cfg.model.dtype]
    codec = TextCodec.from_folder(folder)
    if cfg.generate.prompt_ids is not None:
        prompt_ids = list(cfg.generate.prompt_ids)
    else:
        if codec is None:
            raise ConfigError(f"{folder} has no tokenizer.json: give the prompt as --prompt-ids 1,2,3")
        prompt_ids = codec.encode(DEFAULT_PROMPT if cfg.generate.prompt is None else cfg.generate.prompt)
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give --prompt TEXT or --prompt-ids 1,2,3")
    offload = cfg.cache.budget is not None
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
    model = load_model(folder, dtype=dtype, device=cfg.model.device, progress=not as_json, offload_experts=offload,
                       check_weights=cfg.model.check_weights)
    experts = None
    if offload:
        from moepic.runtime.offload import offloaded_experts

        experts = offloaded_experts(
            model, cfg.cache.budget, cfg.cache.theta, cfg.cache.policy, cfg.cache.predictor,
            link=_link(cfg, model.device), overlap_top=cfg.cache.overlap_top,
        )
        for note in experts.layout.notes:  # a θ that whole neuron blocks rounded: said once, not hidden
            if note.problem():
                experts.close()
                raise ConfigError(note.problem())
            print(f"moepic: note: {note}", file=sys.stderr)
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
            "policy": cfg.cache.policy.as_dict(), "predictor": cfg.cache.predictor.as_dict(), "budget": cfg.cache.budget
        }
        report["stats"] |= experts.report()
        experts.close()
    return report
