"""`moepic serve`: an OpenAI-compatible HTTP server over the offloaded engine, with continuous
batching (moepic/serve). It takes generate's model and cache flags; sampling comes per request.
Side effects: a socket, a worker thread, signals; reads the model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moepic.commands import arguments, run_setup
from moepic.commands.run_setup import RUN_FLAG_KEYS, key_range
from moepic.errors import ConfigError

NAME = "serve"
HELP = "serve the model over HTTP: OpenAI's completions and chat completions, with continuous batching"
TEXT_ON_STDERR = True  # a summary line once the server has stopped

FLAG_KEYS = RUN_FLAG_KEYS | {
    "bind": "serve.bind",
    "port": "serve.port",
    "model_name": "serve.model_name",
    "max_batch": "serve.max_batch",
    "max_queue": "serve.max_queue",
    "prefill_chunk": "serve.prefill_chunk",
    "default_max_tokens": "serve.default_max_tokens",
    "drain_s": "serve.drain_s",
}
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers) -> argparse.ArgumentParser:
    serve = subparsers.add_parser(NAME, help=HELP)
    serve.add_argument("--config", help="YAML run config (keys as in moepic/config.py; the server's under serve:)")
    arguments.add_model(serve, shape=False)
    serve.add_argument("--bind", help="address to listen on (the server has no authentication: loopback unless you "
                       "mean to expose it)")
    serve.add_argument("--port", type=key_range("ServeConfig", "port"), help="TCP port; 0: any free one (announced)")
    serve.add_argument("--model-name", help="the name clients send as `model`", dest="model_name").shows = "the folder's name"
    serve.add_argument("--max-batch", type=key_range("ServeConfig", "max_batch"), help="requests decoded together")
    serve.add_argument("--max-queue", type=key_range("ServeConfig", "max_queue"),
                       help="requests waiting for a place in the batch; one more is refused with 429")
    serve.add_argument("--prefill-chunk", type=key_range("ServeConfig", "prefill_chunk"),
                       help="prompt tokens a new request puts through per step, while the batch keeps decoding")
    serve.add_argument("--default-max-tokens", type=key_range("ServeConfig", "default_max_tokens"),
                       help="a chat request's token limit when it sets none (within the context's rest; its KV cache "
                       "is allocated whole)")
    serve.add_argument("--drain-s", type=key_range("ServeConfig", "drain_s"),
                       help="on Ctrl-C / SIGTERM: seconds requests in flight may take to finish")
    run_setup.add_engine_flags(serve)
    arguments.add_json(serve)
    run_setup.add_config_tail(serve, FLAG_KEYS, example="serve.max_batch=16")
    return serve


def _check_installed() -> None:
    """The server's libraries are an extra (most runs never serve): missing, say how to get them."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "jinja2", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"moepic serve needs {', '.join(missing)}: pip install 'moepic[serve]' (or -e '.[serve]' in a checkout)")


def run(args: argparse.Namespace) -> dict:
    _check_installed()
    from moepic.checkpoint.load import read_spec
    from moepic.default_model import model_folder
    from moepic.runtime.scheduler import Scheduler
    from moepic.serve.app import build_app
    from moepic.serve.chat import read_chat_template
    from moepic.serve.metrics import ServeMetrics
    from moepic.serve.requests import ServedModel
    from moepic.serve.server import listening_socket, serve_until_signalled, url
    from moepic.serve.worker import ServeWorker
    from moepic.tokenizer import TextCodec, no_tokenizer

    arguments.refuse_preset(args.model, NAME)
    cfg = run_setup.run_config(args, FLAG_KEYS)
    run_setup.check_cache_keys_take_effect(cfg, FLAG_KEYS)
    _refuse_generate_keys(cfg)
    run_setup.check_device(cfg)
    folder = model_folder(cfg.model.path)
    codec = TextCodec.from_folder(folder)
    if codec is None:
        raise ConfigError(f"{no_tokenizer(folder)}: moepic serve needs the model's tokenizer to read prompts and write text")
    template = read_chat_template(folder)
    spec, _ = read_spec(folder)
    serve = cfg.serve
    sock = listening_socket(serve.bind, serve.port)  # a taken port fails now, not after loading the weights
    experts = None
    try:
        model, experts = run_setup.load_engine(cfg, folder, progress=not args.json)
        _refuse_own_future(cfg, experts)
        try:
            scheduler = Scheduler(model, experts, max_batch=serve.max_batch, max_queue=serve.max_queue,
                                  prefill_chunk=serve.prefill_chunk)
        except ValueError as e:
            raise ConfigError(f"serve.{e}") from None
        name = serve.model_name or Path(folder).name
        served = ServedModel(name=name, codec=codec, template=template, context=spec.max_position_embeddings,
                             vocab_size=spec.vocab_size, default_max_tokens=serve.default_max_tokens)
        worker = ServeWorker(scheduler, experts)
        app = build_app(served, worker, ServeMetrics(worker))
        if serve.bind not in _LOOPBACK:
            print(f"moepic: note: listening on {serve.bind}, beyond this machine; the server has no authentication",
                  file=sys.stderr)
        started, address = time.perf_counter(), url(sock)
        chat = "with the model's template" if template else "unavailable: no chat template"
        print(f"moepic: serving {name!r} at {address} (OpenAI API under /v1; chat {chat}; Ctrl-C drains and stops)",
              file=sys.stderr, flush=True)
        serve_until_signalled(app, sock, worker, drain_s=serve.drain_s)
    finally:
        sock.close()
        if experts is not None:
            experts.close()
    counters = worker.counters
    return {"model": folder, "name": name, "url": address, "uptime_s": time.perf_counter() - started,
            "steps": counters.steps, "prompt_tokens": counters.prompt_tokens, "generated_tokens": counters.generated_tokens}


def _refuse_generate_keys(cfg) -> None:
    """A run config's generate: and sampling: sections are generate's; a server takes both per request."""
    import attrs

    from moepic.config import GenerateConfig, SamplingConfig

    for section, default in (("generate", GenerateConfig()), ("sampling", SamplingConfig())):
        given = [f.name for f in attrs.fields(type(default)) if getattr(getattr(cfg, section), f.name) != getattr(default, f.name)]
        if given:
            raise ConfigError(f"{section}.{given[0]} has no effect on moepic serve: prompts, limits and sampling come "
                              "with each request (max_tokens, temperature, top_p, seed)")


def _refuse_own_future(cfg, experts) -> None:
    """A policy or predictor that reads the run's own routing trace (belady, oracle) cannot serve:
    requests come with no trace of their future."""
    if experts is None:
        return
    for kind, strategy, node in (("policy", experts.policy, cfg.cache.policy), ("predictor", experts.predictor, cfg.cache.predictor)):
        if hasattr(strategy, "check_prompt"):
            raise ConfigError(f"cache.{kind} {node.name!r} reads a recorded trace of the run's own routing, which "
                              "requests to a server do not come with; choose another")


def text(report: dict) -> str:
    return (f"moepic: served {report['name']!r} for {report['uptime_s']:.1f} s: {report['steps']} steps, "
            f"{report['generated_tokens']} tokens generated for {report['prompt_tokens']} prompt tokens; stopped cleanly")
