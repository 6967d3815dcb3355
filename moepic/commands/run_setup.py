"""What `moepic generate` and `moepic serve` share: the model and cache flags, spelled as config
overrides, the check that every key takes effect, and loading the model with its expert source.
Side effects: reads the model; prints a note per rounded θ.

Flags are config overrides (`RUN_FLAG_KEYS`), so YAML, flags and key=value go one validation path:
defaults ← --config YAML ← flags ← key=value overrides.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping

import attrs

from moepic.commands import arguments
from moepic.errors import ConfigError
from moepic.ranges import LINK_GBPS, LINK_LATENCY_US

# Each flag's config key. A strategy's name before its knobs: a new name replaces the node (merge_layers).
RUN_FLAG_KEYS = {
    "model": "model.path",
    "dtype": "model.dtype",
    "device": "model.device",
    "check_weights": "model.check_weights",
    "expert_format": "model.expert_format.name",
    "budget": "cache.budget",
    "theta": "cache.theta",
    "policy": "cache.policy.name",
    "predictor": "cache.predictor.name",
    "horizon": "cache.predictor.horizon",
    "link_gbps": "cache.link_gbps",
    "link_latency_us": "cache.link_latency_us",
    "hybrid": "cache.hybrid",
    "host_threads": "cache.host_threads",
    "host": "cache.host",
    "miss_format": "cache.miss_format.name",
}


def config_default(key: str):
    """RunConfig's default of `key`, read when the help is shown (the config imports the registries)."""

    def read():
        from moepic.config import RunConfig

        value: object = RunConfig()
        for part in key.split("."):
            value = getattr(value, part, None)
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value

    return read


def key_range(section: str, field: str):
    """The argparse type of a flag that sets a config key: the key's own range (moepic/ranges.py),
    so the flag is named in the error and the rule is written once."""

    def parse(text: str):
        from moepic import config

        return attrs.fields_dict(getattr(config, section))[field].validator.parse(text)

    return parse


def _floats(text: str) -> str:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return str(values[0]) if len(values) == 1 else "[" + ",".join(map(str, values)) + "]"


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `RUN_FLAG_KEYS` but --model: weights, device, offloading, hybrid compute."""
    arguments.add_dtype(parser, "dtype of the weights, auto: the checkpoint's")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 …")
    arguments.strategy_flag(parser, "expert-format", "keep routed experts as: {names} (default: as the checkpoint stores "
                            "them; dense dequantises, the others encode as they load; knobs as "
                            "model.expert_format.group_size=128; `moepic quantize` writes such a checkpoint)",
                            shows=lambda: "as stored")
    parser.add_argument("--no-check-weights", dest="check_weights", action="store_false", default=None,
                        help="skip the NaN/Inf check of each weight as it loads (done by default; skipping "
                        "saves 0.01-0.3 s per GB: experiments/bench_weight_check.py)")
    arguments.add_budget(parser, "offload experts: device memory for them, 512MiB or 0.25 (of all expert bytes); "
                         "or a,b,… cache sizes per MoE layer")
    parser.add_argument("--theta", type=_floats, help="split ratio: one value or one per MoE layer (0.5 or 0.25,0.5,…)")
    arguments.strategy_flag(parser, "policy", "cache policy: {names}")
    arguments.strategy_flag(parser, "predictor", "prefetch with an expert predictor: {names} (none: load on demand)")
    parser.add_argument("--horizon", type=int, help="MoE layers ahead the predictor prefetches (1-3)")
    parser.add_argument("--link-gbps", type=LINK_GBPS.parse, help="CPU: emulate a host→device link of this many GB/s")
    parser.add_argument("--link-latency-us", type=LINK_LATENCY_US.parse, help="CPU: per-copy latency of the emulated link, µs")
    arguments.strategy_flag(parser, "miss-format", "offloaded runs, changes numbers: serve each miss from a low-bit copy in "
                            "this format ({names}; knobs as cache.miss_format.group_size=128) while the cache keeps the "
                            "expert itself", shows=lambda: "off", names=arguments.registered_names("expert format"))
    arguments.add_hybrid(parser, threads=True)
    arguments.add_host(parser, "CUDA only: it prices --hybrid auto (default: measured at start-up; on a CPU device the "
                       "host is measured and the link is the emulated one: no --link-gbps, copies are free and auto "
                       "copies every load)")


def add_config_tail(parser: argparse.ArgumentParser, flag_keys: Mapping[str, str], *, example: str = "sampling.seed=3") -> None:
    """--allow-env, the key=value overrides and --progress; then each override flag shows its
    config key's default in the help, unless it says its own."""
    parser.add_argument("--allow-env", action="store_true", help="let configs read environment variables with ${oc.env:NAME}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    arguments.add_progress(parser)
    for action in parser._actions:
        if action.dest in flag_keys and not hasattr(action, "shows"):
            action.shows = config_default(flag_keys[action.dest])


def _yaml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if " " <= c <= "~":
        return c
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def literal(text: str) -> str:
    """`text` as an override value that OmegaConf reads back verbatim.

    A YAML double-quoted scalar with every non-ASCII character escaped (YAML rejects some raw
    characters and JSON's surrogate-pair escapes for emoji). `${` becomes `\\${` so a prompt is never
    an interpolation, and backslashes just before it are doubled, as OmegaConf's escaping asks.
    """
    escaped = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    return '"' + "".join(map(_yaml_char, escaped)) + '"'


def _flag_overrides(args: argparse.Namespace, flag_keys: Mapping[str, str]) -> list[str]:
    out = []
    for flag, key in flag_keys.items():
        value = getattr(args, flag)
        if value is not None:
            quoted = isinstance(value, str) and flag not in ("prompt_ids", "theta")
            if flag == "budget" and "," in value:  # one cache size per MoE layer
                value, quoted = "[" + ",".join(literal(v.strip()) for v in value.split(",")) + "]", False
            out.append(f"{key}={literal(value) if quoted else value}")
    return out


def run_config(args: argparse.Namespace, flag_keys: Mapping[str, str]):
    """defaults ← --config YAML ← flags ← key=value overrides. `--policy NAME` is the override
    `cache.policy.name=NAME`: a YAML policy of another name is replaced whole, knobs and all."""
    from moepic.config import load_config

    return load_config(args.config, [*_flag_overrides(args, flag_keys), *args.overrides], allow_env=args.allow_env)


def flag_named(key: str, flag_keys: Mapping[str, str]) -> str:
    """`key`, with the flag that sets it where one does: `cache.hybrid (--hybrid)`."""
    flags = [f"--{flag.replace('_', '-')}" for flag, k in flag_keys.items() if k.split(".")[:2] == key.split(".")]
    return f"{key} ({flags[0]})" if flags else key


def check_cache_keys_take_effect(cfg, flag_keys: Mapping[str, str] = RUN_FLAG_KEYS) -> None:
    """A cache key the chosen mode ignores is an error, never silently dropped: the user meant something by it."""
    from moepic.config import CacheConfig

    def named(key: str) -> str:
        return flag_named(key, flag_keys)

    if cfg.cache.budget is None and cfg.cache.hybrid != "off":
        raise ConfigError(f"{named('cache.hybrid')} needs {named('cache.budget')}: with every expert resident nothing is loaded")
    if cfg.cache.budget is None:
        dense = CacheConfig()
        ignored = [f"cache.{f.name}" for f in attrs.fields(CacheConfig) if getattr(cfg.cache, f.name) != getattr(dense, f.name)]
        if ignored:
            raise ConfigError(
                f"{named(ignored[0])} has no effect without cache.budget (--budget): the dense run keeps every expert "
                "on the device; give a budget to offload, or leave it out"
            )
    if cfg.cache.link_latency_us and cfg.cache.link_gbps is None:
        raise ConfigError(f"{named('cache.link_latency_us')} has no effect without cache.link_gbps (--link-gbps): no link is emulated")
    for key, needs in (("host_threads", ("auto", "host-only")), ("host", ("auto",))):
        if getattr(cfg.cache, key) is not None and cfg.cache.hybrid not in needs:
            raise ConfigError(
                f"{named('cache.' + key)} has no effect with cache.hybrid {cfg.cache.hybrid} (--hybrid): "
                f"it is for --hybrid {' or '.join(needs)}"
            )


def check_device(cfg) -> None:
    """model.device names a device this machine has; --host and --host-threads go with a CUDA one."""
    import torch

    try:
        torch.device(cfg.model.device)
    except RuntimeError:
        raise ConfigError(f"model.device {cfg.model.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {cfg.model.device!r}, but CUDA is not available on this machine")
    if torch.device(cfg.model.device).type != "cuda":
        for key, flag, why in (("host", "--host", "priced by measuring it"), ("host_threads", "--host-threads", "torch's threads")):
            if getattr(cfg.cache, key) is not None:
                raise ConfigError(f"cache.{key} ({flag}) is for a CUDA device; on {cfg.model.device!r} the host is the "
                                  f"device ({why})")


def _link(cfg, device):
    from moepic.runtime.copy_engine import Link

    if cfg.cache.link_gbps is None:
        return None
    if device.type == "cuda":
        raise ConfigError("cache.link_gbps emulates a link for CPU runs; on CUDA the real link is used")
    return Link(gbps=cfg.cache.link_gbps, latency_us=cfg.cache.link_latency_us)


def _pricing(cfg, model, link):
    """What `--hybrid auto` places loads by: measured or named at start-up (runtime/host_pricing.py)."""
    if cfg.cache.hybrid != "auto":
        return None
    from moepic.quant import format_of
    from moepic.runtime.host_pricing import run_pricing

    expert = next(lw.ffn.experts[0] for lw in model.weights.layers if hasattr(lw.ffn, "experts"))
    return run_pricing(model.device, model.dtype.itemsize, host=cfg.cache.host, link=link, threads=cfg.cache.host_threads,
                       expert_format=format_of(expert), note=lambda text: print(f"moepic: note: {text}", file=sys.stderr))


def load_engine(cfg, folder: str, *, progress: bool):
    """The model of `folder` as `cfg.model` asks, and its expert source: the offloading engine
    under a budget (None: every expert resident). A θ rounded to whole neuron blocks is noted once."""
    from moepic.checkpoint.hf_config import DTYPES
    from moepic.checkpoint.load import load_model
    from moepic.quant import build_format

    offload = cfg.cache.budget is not None
    dtype = None if cfg.model.dtype == "auto" else DTYPES[cfg.model.dtype]
    model = load_model(folder, dtype=dtype, device=cfg.model.device, progress=progress, offload_experts=offload,
                       check_weights=cfg.model.check_weights,
                       expert_format=None if cfg.model.expert_format is None else build_format(cfg.model.expert_format))
    if not offload:
        return model, None
    from moepic.runtime.offload import offloaded_experts

    link = _link(cfg, model.device)
    experts = offloaded_experts(
        model, cfg.cache.budget, cfg.cache.theta, cfg.cache.policy, cfg.cache.predictor,
        link=link, overlap_top=cfg.cache.overlap_top, hybrid=cfg.cache.hybrid,
        pricing=_pricing(cfg, model, link), host_threads=cfg.cache.host_threads,
        miss_format=None if cfg.cache.miss_format is None else build_format(cfg.cache.miss_format),
    )
    for note in experts.layout.notes:  # a θ that whole neuron blocks rounded: said once, not hidden
        if note.problem():
            experts.close()
            raise ConfigError(note.problem())
        print(f"moepic: note: {note}", file=sys.stderr)
    return model, experts
