"""An experiment cell's config: a system (baseline file) on a workload, run by a backend. Pure + file reading.

    experiments/configs/base.yaml ← a system file (moepic/sim/baselines/NAME.yaml) ← key=value overrides
        ─▶ ExperimentConfig (frozen; validated: unknown keys and strategy names fail with the file,
           the key and the known choices)

A system file is an experiment config that sets only the system's keys (`approximates`, `cache`,
`configurator`, `policy_choices`), so the same YAML drives `moepic compare --baseline NAME` and an
ablation cell. Swapping a strategy is replacing one node (`cache.policy: {name: lfu}`, or the
override `cache.policy.name=lfu`, which drops the old policy's knobs: `structure.merge_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs

from moepic.structure import load_layers, read_yaml
from moepic.ranges import BATCH, CONTEXT_TOKENS, LINK_GBPS, RECALL, SEED, STREAM_TOKENS, Range
from moepic.sim.baseline import SystemConfig, baseline_path

Recall = float | tuple[float, ...]

# Counts of a cell's work: at least one, and bounded, so a typo (1e9 tokens) fails on load, not after
# minutes of allocation.
TOKENS = Range(1, 10**7, whole=True)
REQUESTS = Range(1, 10**4, whole=True)


@attrs.frozen(kw_only=True)
class SyntheticConfig:
    """A seeded synthetic trace of the model shape (`moepic/tracing/synthetic.py`), used when
    `workload.trace` is null. The laws are one value for every layer, or a `moepic fit-trace` file."""

    params: str | None = None  # a `moepic fit-trace` JSON; null: the laws below
    tokens: int = attrs.field(default=1000, validator=TOKENS)
    sequences: int = attrs.field(default=4, validator=REQUESTS)
    seed: int = attrs.field(default=0, validator=SEED)
    # Defaults: the medians over layers of `fit_synthetic` on the shared Mixtral gsm8k trace.
    skew: float = 0.5
    reuse: float = 0.9
    decay: float = 0.6
    correlation: float = 1.0


@attrs.frozen(kw_only=True)
class RecordedConfig:
    """Routing recorded here: the model (`workload.model_shape`, a folder or `bundled`) generates
    greedily from prompts cut from a dataset's second half, with router inputs, so gate lookahead
    and mlp run for real. The engine backend runs exactly these requests."""

    dataset: str = "kjv-heldout"  # moepic routing-report's datasets
    requests: int = attrs.field(default=4, validator=REQUESTS)
    prompt_tokens: int = attrs.field(default=64, validator=CONTEXT_TOKENS)
    new_tokens: int = attrs.field(default=32, validator=TOKENS)


@attrs.frozen(kw_only=True)
class WorkloadConfig:
    """What runs: routing (a trace file, a synthetic trace, or recorded here) on a model shape and a
    hardware profile."""

    source: Literal["trace", "synthetic", "recorded"] = "trace"
    trace: str | None = None  # source trace: a .npz trace or a JSONL routing log (relative: to the working directory)
    synthetic: SyntheticConfig = SyntheticConfig()
    recorded: RecordedConfig = RecordedConfig()
    max_tokens: int | None = attrs.field(default=None, validator=TOKENS)  # keep the trace's first N tokens
    # A preset (moepic/sim/shapes.py), a model folder, or `bundled` (the model that ships with moepic).
    model_shape: str = "mixtral-8x7b"
    hardware: str = "a6000"  # a bundled profile or a `moepic profile` YAML
    link_gbps: float | None = attrs.field(default=None, validator=LINK_GBPS)  # replaces the profile's host link (PCIe 3/4/5)
    # The host CPU beside the device, for hybrid systems (a bundled host profile or a YAML file, as
    # `--host`); None: the hardware profile's own host section, if it has one.
    host: str | None = None
    # A noisy oracle of this recall stands in for gate_lookahead/mlp where they cannot run (no
    # router inputs in the trace); one value, or one per MoE layer.
    recall: Recall | None = attrs.field(default=0.85, validator=RECALL)
    context_tokens: int = attrs.field(default=512, validator=CONTEXT_TOKENS)  # attention context of a decode step (a recorded workload: its own)
    # The trace's requests decoded `batch` at a time in continuous-batching order (backend sim;
    # moepic/sim/steps.py); with `stream_tokens`, each sequence is cut into requests of that many
    # decode tokens first (the shared traces hold two long sequences). 1, null: one after another.
    batch: int = attrs.field(default=1, validator=BATCH)
    stream_tokens: int | None = attrs.field(default=None, validator=STREAM_TOKENS)


@attrs.frozen(kw_only=True)
class EngineConfig:
    """`backend: engine`: the real offloading engine runs `workload.recorded` on its model (CPU:
    over the emulated `cache.link_gbps`), every run's tokens checked against the dense model's."""

    repeats: int = attrs.field(default=3, validator=REQUESTS)  # timed runs (median), after one warm-up


@attrs.frozen(kw_only=True)
class WandbConfig:
    enabled: bool = False
    # offline writes run folders to sync later (`wandb sync`); online needs `wandb login`.
    # WANDB_MODE in the environment wins over this.
    mode: Literal["offline", "online"] = "offline"
    project: str = "moepic-ablations"
    entity: str | None = None


@attrs.frozen(kw_only=True)
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    workers: int | None = attrs.field(default=None, validator=Range(1, 4096, whole=True))  # local processes; null: the CPU count
    address: str | None = None  # ray: a cluster address (RAY_ADDRESS wins, as in ray.init); null: a local instance


@attrs.frozen(kw_only=True)
class ExperimentConfig(SystemConfig):
    system: str = "custom"  # the system file it came from (a label in tables and dashboards); custom: none
    workload: WorkloadConfig = WorkloadConfig()
    backend: Literal["sim", "engine"] = "sim"
    engine: EngineConfig = EngineConfig()
    wandb: WandbConfig = WandbConfig()
    executor: ExecutorConfig = ExecutorConfig()

    def setup(self, name: str | None = None):
        return super().setup(name or self.system)


def system_file(name_or_path: str) -> Path:
    """A named system (the baselines of `moepic compare`) or a YAML file of one."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return baseline_path(name_or_path)


def load_experiment(
    base: str | Path | None, system: str | None = None, overrides: Sequence[str] = (), *, allow_env: bool = False
) -> ExperimentConfig:
    """defaults ← `base` YAML ← the system's file ← `key=value` overrides. The system is `system`,
    else the one the base names (`system: moepic-lcp`; `custom`, the default, names none).
    No layer may call an OmegaConf resolver; `allow_env` (`--allow-env`) lets `${oc.env:NAME}` through."""
    files = [base]
    if system is None and base is not None:
        named = read_yaml(Path(base)).get("system", "custom")
        system = None if named == "custom" else str(named)
    if system is not None:
        files.append(system_file(system))
        overrides = [f"system={Path(system).stem}", *overrides]
    return load_layers(ExperimentConfig, files, overrides, allow_env=allow_env)


__all__ = ["ExperimentConfig", "load_experiment", "system_file"]
