"""Model shapes the simulator knows by name, or reads from a checkpoint's config.json. Pure.

A shape is a `ModelSpec` (no weights) and the bytes per weight: all the latency model needs.
Presets are the published configs of real MoE checkpoints (bf16), so a trace can be simulated for
a model one does not have. Those whose config.json values are kept in moepic/sim/published.py are
read from them by the checkpoint adapters (DeepSeek's latent attention and routers included).
"""

from __future__ import annotations

from pathlib import Path

import attrs

from moepic.core.spec import ModelSpec, MoESpec, RopeSpec, RouterSpec
from moepic.errors import ConfigError
from moepic.quant import ExpertFormat, build_format
from moepic.sim.published import PUBLISHED_CONFIGS


@attrs.frozen(kw_only=True)
class ModelShape:
    name: str
    spec: ModelSpec
    dtype_bytes: int
    # How its routed experts are stored (moepic/quant): a miss moves this format's bytes.
    expert_format: ExpertFormat = attrs.field(factory=lambda: build_format("dense"))
    # One format per MoE layer where they differ (a GGUF file's kinds vary by layer); None: `expert_format`'s.
    layer_formats: tuple[ExpertFormat, ...] | None = None

    @property
    def expert_formats(self) -> tuple[ExpertFormat, ...]:
        """Each MoE layer's experts' format."""
        return self.layer_formats or (self.expert_format,) * len(self.spec.moe_layers)

    @property
    def expert_bytes(self) -> int:
        """Every routed expert's bytes, in its layer's format."""
        moe = self.spec.moe
        return sum(moe.num_experts * moe.expert_ffn * f.spec_neuron_bytes(self.spec, self.dtype_bytes) for f in self.expert_formats)


def _preset(name, *, vocab, hidden, heads, kv_heads, head_dim, layers, experts, top_k, ffn, shared=0,
            first_dense=0, dense_ffn=0, renormalize=True) -> ModelShape:
    spec = ModelSpec(
        model_type=name, vocab_size=vocab, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        norm_eps=1e-6, rope=RopeSpec(theta=1e6), layer_kinds=("dense",) * first_dense + ("moe",) * (layers - first_dense),
        moe=MoESpec(num_experts=experts, top_k=top_k, expert_ffn=ffn, shared_expert_ffn=shared, shared_expert_gated=bool(shared),
                    router=RouterSpec(renormalize=renormalize)),
        dense_ffn=dense_ffn,
    )
    return ModelShape(name=name, spec=spec, dtype_bytes=2)


PRESETS = {
    "mixtral-8x7b": _preset("mixtral-8x7b", vocab=32000, hidden=4096, heads=32, kv_heads=8, head_dim=128, layers=32,
                            experts=8, top_k=2, ffn=14336),
    "qwen1.5-moe-a2.7b": _preset("qwen1.5-moe-a2.7b", vocab=151936, hidden=2048, heads=16, kv_heads=16, head_dim=128,
                                 layers=24, experts=60, top_k=4, ffn=1408, shared=5632, renormalize=False),
    "olmoe-1b-7b": _preset("olmoe-1b-7b", vocab=50304, hidden=2048, heads=16, kv_heads=16, head_dim=128, layers=16,
                           experts=64, top_k=8, ffn=1024, renormalize=False),
    "qwen3-30b-a3b": _preset("qwen3-30b-a3b", vocab=151936, hidden=2048, heads=32, kv_heads=4, head_dim=128, layers=48,
                             experts=128, top_k=8, ffn=768),
}


def _from_config(name: str, config: dict) -> ModelShape:
    from moepic.checkpoint.adapters import adapter_for
    from moepic.checkpoint.hf_config import HFConfig

    from moepic.checkpoint.stored_experts import checkpoint_format

    cfg = HFConfig(config, source=f"preset {name}")
    return ModelShape(name=name, spec=adapter_for(cfg.model_type, cfg.source).spec(cfg), dtype_bytes=2,
                      expert_format=checkpoint_format(cfg))  # GPT-OSS: its release's MXFP4


PRESETS |= {name: _from_config(name, config) for name, (config, _) in PUBLISHED_CONFIGS.items()}


def known_shapes() -> str:
    return ", ".join(sorted(PRESETS))


def model_shape(name_or_dir: str) -> ModelShape:
    """A preset by name (case-insensitive), or the shape of a Hugging Face folder's config.json or a GGUF file."""
    preset = PRESETS.get(name_or_dir.lower())
    if preset is not None:
        return preset
    import torch

    from moepic.checkpoint.gguf_names import is_gguf
    from moepic.checkpoint.load import read_spec
    from moepic.checkpoint.stored_experts import checkpoint_formats

    if not Path(name_or_dir).is_dir() and not is_gguf(name_or_dir):
        raise ConfigError(f"unknown model shape {name_or_dir!r}; known: {known_shapes()} (or a model folder with config.json, "
                          "or a GGUF file)")

    spec, cfg = read_spec(Path(name_or_dir))
    if spec.moe is None:
        raise ConfigError(f"{name_or_dir}: the model has no routed experts to simulate")
    formats = checkpoint_formats(cfg, len(spec.moe_layers))  # a GGUF file's vary by layer
    return ModelShape(name=Path(name_or_dir).name, spec=spec, dtype_bytes=torch.empty((), dtype=cfg.checkpoint_dtype()).element_size(),
                      expert_format=formats[0], layer_formats=formats if len({f.config for f in formats}) > 1 else None)
