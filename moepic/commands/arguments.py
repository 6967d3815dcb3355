"""The arguments the `moepic` commands share, each spelled once: the parser class and help format,
`--model`, `--budget`, `--recall`, the strategy flags, `--json` and `--progress`.

Strategy names and defaults in help texts come from the registries, and the dtype choices from the
checkpoint reader, but only when a help text is shown or a value checked: building the parser
imports nothing heavy, so `moepic --help` stays fast. Pure apart from argparse; `model_note` prints.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moepic.errors import ConfigError
from moepic.ranges import HOST_THREADS


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump is noise for a one-line mistake
        # main prints "moepic: error: "; a command's own parser adds the command's name after it.
        command = self.prog.removeprefix("moepic").strip()
        raise ConfigError(f"{command}: {message}" if command else message)


def _resolved(value):
    return value() if callable(value) else value


def shown_default(action: argparse.Action):
    """The default `--help` shows: a flag's own, or the config/registry default it stands for (`shows`)."""
    return _resolved(getattr(action, "shows", action.default))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help; for a flag whose argparse default is None because a config
    key or a registry decides, that default (`shows`). Never "(default: None)". A help text's
    `{name}` fields are filled from the action's `fills` (callables, run when help is shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        fills = getattr(action, "fills", None)
        if fills:
            help = help.format(**{name: _resolved(fill) for name, fill in fills.items()})
        if "default" in help or action.option_strings == [] or action.default is argparse.SUPPRESS:
            return help
        default = shown_default(action)
        if default is None or isinstance(action, argparse._StoreTrueAction) and default is False:
            return help
        return f"{help} (default: {default})".strip()


class LazyChoices(Sequence):
    """argparse `choices` computed on first use (a value checked, the help shown)."""

    def __init__(self, make: Callable[[], Sequence[str]]) -> None:
        self._make, self._values = make, None

    def _all(self) -> Sequence[str]:
        if self._values is None:
            self._values = tuple(self._make())
        return self._values

    def __getitem__(self, index):
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())


def _dtype_names() -> tuple[str, ...]:
    from moepic.checkpoint.hf_config import DTYPES

    return ("auto", *DTYPES)


def add_dtype(parser, help: str, *, default: str | None = None) -> None:
    """`--dtype`: its choices are named in the help (a metavar keeps argparse from listing them at build time)."""
    action = parser.add_argument("--dtype", choices=LazyChoices(_dtype_names), default=default, metavar="DTYPE",
                                 help=help + " ({dtypes})")
    action.fills = {"dtypes": lambda: ", ".join(_dtype_names())}


# --- the registries: names and defaults in help texts -------------------------------------------

REGISTRIES = {
    "policy": ("moepic.policies", "POLICIES"),
    "predictor": ("moepic.predictors", "PREDICTORS"),
    "configurator": ("moepic.configurators", "CONFIGURATORS"),
    "expert format": ("moepic.quant", "EXPERT_FORMATS"),
    "expert-format": ("moepic.quant", "EXPERT_FORMATS"),
}


def registry(kind: str):
    module, name = REGISTRIES[kind]
    return getattr(importlib.import_module(module), name)


def registered_names(kind: str) -> Callable[[], str]:
    return lambda: registry(kind).known()


def registry_default(kind: str) -> Callable[[], str]:
    return lambda: registry(kind).default


def baseline_names() -> str:
    from moepic.sim.baseline import known_baselines

    return known_baselines()


def strategy_flag(parser, kind: str, help: str, *, shows: Callable[[], object] | None = None, **fills) -> argparse.Action:
    """`--policy` / `--predictor` / `--configurator`: `help` may use `{names}` (the registered names)
    and any `fills`; the default shown is the registry's (or `shows`)."""
    action = parser.add_argument(f"--{kind}", metavar="NAME", help=help)
    action.fills = {"names": registered_names(kind), **fills}
    action.shows = shows or registry_default(kind)
    return action


def strategy_name(kind: str, given: str | None) -> dict:
    """The YAML node of a strategy flag: its name, or the registry default's (an empty node)."""
    return {} if given is None else {"name": given}


# --- --model --------------------------------------------------------------------------------------

# sim/shapes.py's presets are the published bf16 checkpoints (2 bytes a weight).
PRESET_DTYPE = "bfloat16"


def add_model(parser, *, shape: bool, help: str | None = None) -> None:
    """`--model`: a model folder; where only the shape is needed, also a preset shape name."""
    if shape:
        action = parser.add_argument("--model", metavar="DIR|PRESET", help=help or (
            "Hugging Face model folder, or a preset shape ({presets}) (default: the built-in model)"))
        action.fills = {"presets": lambda: importlib.import_module("moepic.sim.shapes").known_shapes()}
    else:
        parser.add_argument("--model", metavar="DIR", help=help or "Hugging Face model folder (default: the built-in model)")


def _preset(text: str | None):
    if text is None or Path(text).is_dir() or Path(text).is_file():  # a folder, or a GGUF file
        return None
    from moepic.sim.shapes import PRESETS

    return PRESETS.get(text.lower())


def refuse_preset(text: str | None, command: str) -> None:
    if _preset(text) is not None:
        raise ConfigError(f"--model {text}: a preset shape has no weights; {command} needs a model folder with weights")


def weights_folder(text: str | None, command: str) -> str:
    """The folder of a command that needs the weights: `text`, or the built-in model."""
    from moepic.default_model import model_folder

    refuse_preset(text, command)
    return model_folder(text)


def model_source(text: str | None):
    """What `--model` names for a command that needs only the shape: a folder (str; the built-in
    model when not given), or a preset `ModelShape`. A name that is neither lists the presets."""
    from moepic.default_model import model_folder
    from moepic.sim.shapes import model_shape

    preset = _preset(text)
    if preset is not None:
        return preset
    if text is None or "/" in text or Path(text).exists() or text.startswith("."):
        return model_folder(text)  # a path: one that does not exist is named as a missing folder
    return model_shape(text)  # raises: an unknown preset, with the known ones


def model_shape_note() -> None:
    print("moepic: note: --model-shape is deprecated; use --model", file=sys.stderr)


# --- budget, recall, output --------------------------------------------------------------------------


def _known_hardware() -> str:
    from moepic.perfmodel.hardware import known_profiles

    return ", ".join(known_profiles())


def known_host_names() -> str:
    from moepic.perfmodel.hardware import known_hosts

    return ", ".join(known_hosts())


def add_hardware(parser, help: str = "a bundled profile ({profiles}) or a YAML file from `moepic profile`") -> None:
    """`--hardware` and `--host` (the CPU beside the device); `hardware_profile` reads both."""
    action = parser.add_argument("--hardware", required=True, metavar="NAME|FILE", help=help)
    action.fills = {"profiles": _known_hardware}
    add_host(parser, "it replaces the --hardware profile's own host section")


def add_host(parser, what: str) -> None:
    """`--host`: a host CPU profile; `what` says what it does in this command."""
    host = parser.add_argument("--host", metavar="NAME|FILE", help=(
        "host CPU profile: a bundled one ({hosts}), or a YAML file (a host profile, or one from `moepic profile`); " + what))
    host.fills = {"hosts": known_host_names}


def _hybrid_mode(text: str) -> str:
    from moepic.cache.placement import HYBRID_MODES

    if text not in HYBRID_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(HYBRID_MODES)}, got {text!r}")
    return text


def add_hybrid(parser, *, threads: bool = False) -> None:
    """`--hybrid` (cache.hybrid), and on the engine `--host-threads` (cache.host_threads)."""
    parser.add_argument("--hybrid", type=_hybrid_mode, metavar="off|auto|host-only", help=(
        "where missed experts and bottoms run: copied to the device (off), computed on the host CPU where that is "
        "sooner (auto), or always on the host (host-only)"))
    if threads:
        action = parser.add_argument("--host-threads", type=HOST_THREADS.parse, metavar="N",
                                     help="host worker threads for hybrid runs")
        action.shows = "the physical cores less one"


def hardware_profile(args):
    """The `--hardware` profile, carrying the `--host` profile as its host section when given.
    A CPU device has no host apart from itself, so `--host` with one is a mistake."""
    import attrs

    from moepic.perfmodel.hardware import load_host, load_profile

    hw = load_profile(args.hardware)
    if args.host is None:
        return hw
    if hw.device == "cpu":
        raise ConfigError(f"--host {args.host}: the hardware profile {hw.name!r} is a CPU (device: cpu), which is its "
                          "own host; a host profile goes with a GPU profile")
    return attrs.evolve(hw, host=load_host(args.host))


def host_name(hw) -> str | None:
    """What a report's `host` field says: the name of the host profile in effect, None without one."""
    return hw.host.name if hw.host is not None else None


def host_lines(report: dict) -> list[str]:
    """The text a report with a host profile ends with: which one priced host compute."""
    host = report.get("host")
    return [] if host is None else [f"host: {host}"]


def add_budget(parser, help: str, *, required: bool = False) -> None:
    parser.add_argument("--budget", required=required, help=help)


def check_budget_form(text: str | None) -> None:
    """Its form (unit, sign, size) before any file is read."""
    from moepic.cache.layout import budget_bytes

    if text is not None:
        budget_bytes(text, 1, "--budget")


RECALL_MEANING = ("the predictor's recall: one value for every MoE layer after the first (nothing "
                  "before it can predict it), or one per MoE layer, the first 0 (0.85, or 0,0.7,0.9,…)")


def add_recall(parser, when: str) -> None:
    """`--recall`, the same value in every command; `when` says what the command uses it for."""
    parser.add_argument("--recall", metavar="R", help=f"{RECALL_MEANING}; {when}")


def parse_recall(text: str | None, moe_layers: int) -> float | tuple[float, ...] | None:
    """`--recall`: one value (every MoE layer after the first), or one per MoE layer whose first is 0;
    None when not given."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, moe_layers) or not all(0 <= v <= 1 for v in values):  # nan fails too
        raise ConfigError(f"--recall must be one value in [0, 1] or {moe_layers} (one per MoE layer), got {text!r}")
    if len(values) == 1:
        return values[0]
    if values[0] != 0:
        raise ConfigError(f"--recall: the first MoE layer's recall must be 0 (no layer before it predicts it), got {text!r}")
    return tuple(values)


def add_json(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_progress(parser) -> None:
    parser.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")


# --- expert formats -------------------------------------------------------------------------------


def add_expert_format(parser, help: str, *, flag: str = "--format", default: str | None = None) -> None:
    """`--format NAME` (or `flag`) with the group formats' knobs `--group-size` and `--asymmetric`."""
    action = parser.add_argument(flag, dest="expert_format", metavar="NAME", default=default, help=help)
    action.fills = {"formats": registered_names("expert format")}
    parser.add_argument("--group-size", type=int, default=64, help=f"with {flag} int8/int4: weights per scale, along the hidden dimension")
    parser.add_argument("--asymmetric", action="store_true", help=f"with {flag} int8/int4: a zero point per group too")


def _known_format(name: str, flag: str):
    """The expert-format registry, once `name` is known to it; else one line naming the flag."""
    formats = registry("expert format")
    if name not in formats:
        raise ConfigError(f"{flag}: unknown expert format {name!r}; known: {formats.known()}")
    return formats


def add_miss_format(parser, help: str) -> None:
    """`--miss-format NAME` (`cache.miss_format`, with the format's default knobs); `help` may use {formats}."""
    action = parser.add_argument("--miss-format", metavar="NAME", help=help)
    action.fills = {"formats": registered_names("expert format")}


def miss_format(args):
    """The ExpertFormat `--miss-format` names, or None where none was given."""
    if args.miss_format is None:
        return None
    _known_format(args.miss_format, "--miss-format")
    return importlib.import_module("moepic.quant").build_format(args.miss_format)


def expert_format(args, *, flag: str = "--format"):
    """The ExpertFormat the flags name, or None where none was given; a mistake names the flag."""
    if args.expert_format is None:
        return None
    formats = _known_format(args.expert_format, flag)
    knobs = importlib.import_module("attrs").fields_dict(formats[args.expert_format].config)
    node = {"name": args.expert_format}
    if "group_size" in knobs:
        if args.group_size < 1:
            raise ConfigError(f"--group-size: at least 1, got {args.group_size}")
        node |= {"group_size": args.group_size}
    if "symmetric" in knobs:
        node |= {"symmetric": not args.asymmetric}
    elif args.asymmetric:
        raise ConfigError(f"--asymmetric: {args.expert_format} has no symmetric or asymmetric groups to choose")
    return importlib.import_module("moepic.quant").build_format(node)
