"""Which OmegaConf interpolations a user config may use: other keys (`${model.device}`), no resolvers. Pure.

A resolver runs code while a config loads: `${oc.env:HOME}` in a shared YAML file, or in a
`key=value` someone pasted, pulls an environment variable into the run and into its logged config
(W&B). So no resolver runs unless the user opts in: `--allow-env` lets `oc.env` through, and
nothing else. The check reads OmegaConf's own grammar, so nesting (`${a.${oc.env:X}}`) and
escaping (`\\${oc.env:X}` is text) are read as OmegaConf reads them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import grammar_parser
from omegaconf.errors import GrammarParseError
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from moepic.errors import ConfigError


def _resolvers_used(text: str) -> list[str]:
    """The names of the resolvers `${name:…}` a string calls (escaped `\\${` is text, not a call)."""
    if "${" not in text:
        return []
    try:
        tree = grammar_parser.parse(text)
    except GrammarParseError:
        return []  # not an interpolation OmegaConf can run; resolving it reports the error
    names, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            names.append(node.resolverName().getText())
        stack.extend(node.getChild(i) for i in range(node.getChildCount()) if hasattr(node.getChild(i), "getChildCount"))
    return names


def check_resolvers(data: Any, where: str, *, allow_env: bool = False, key: str = "") -> None:
    """Configs may interpolate other keys (`${model.device}`) but call no OmegaConf resolver: a
    shared config file must not pull environment variables (`${oc.env:HOME}`) into a run and its
    logged config. `allow_env` (the `--allow-env` flag) lets `oc.env` through, and nothing else."""
    if isinstance(data, dict):
        for k, v in data.items():
            check_resolvers(v, where, allow_env=allow_env, key=f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_resolvers(v, where, allow_env=allow_env, key=f"{key}[{i}]")
    elif isinstance(data, str):
        for name in _resolvers_used(data):
            if allow_env and name == "oc.env":
                continue
            hint = "; pass --allow-env to let oc.env read the environment" if name == "oc.env" else ""
            raise ConfigError(
                f"{where}: config key {key}: {data!r} calls the resolver {name}; configs may only interpolate "
                f"other keys (${{section.key}}){hint}"
            )
