"""`moepic inspect`: a model's shape and memory from config.json alone (no weights are read), or a
preset shape's (moepic/sim/shapes.py). Reads files only."""

from __future__ import annotations

from collections import Counter

from moepic.commands import arguments

NAME = "inspect"
HELP = "a model's shape and memory, from config.json alone or a preset"


def add_parser(subparsers):
    inspect = subparsers.add_parser(NAME, help=HELP)
    arguments.add_model(inspect, shape=True)
    arguments.add_dtype(inspect, "count bytes in this dtype", default="auto")
    arguments.add_expert_format(inspect, "count routed experts' bytes in this format: {formats} (default: the "
                                "checkpoint's own: dense, GPT-OSS's MXFP4, FP8, or what `moepic quantize` wrote)")
    arguments.add_json(inspect)
    return inspect


def run(args) -> dict:
    return run_inspect(args.model, args.dtype, arguments.expert_format(args))


def run_inspect(model: str | None, dtype_name: str, expert_format=None) -> dict:
    """Spec and parameter/byte counts of a model folder or preset, without reading any weights."""
    import attrs
    import torch

    from moepic.checkpoint.hf_config import DTYPES
    from moepic.checkpoint.load import read_spec
    from moepic.checkpoint.stored_experts import checkpoint_formats
    from moepic.core.footprint import footprint, kv_cache_growth

    source = arguments.model_source(model)
    if isinstance(source, str):
        spec, cfg = read_spec(source)
        name, own_dtype = source, cfg.checkpoint_dtype()
        own_formats = checkpoint_formats(cfg, len(spec.moe_layers)) if expert_format is None else ()
    else:
        spec, name, own_dtype = source.spec, source.name, DTYPES[arguments.PRESET_DTYPE]
        own_formats = (source.expert_format,) * len(spec.moe_layers)
    formats = (expert_format,) * len(spec.moe_layers) if expert_format is not None else own_formats
    dtype = own_dtype if dtype_name == "auto" else DTYPES[dtype_name]
    fp, size = footprint(spec), torch.empty((), dtype=dtype).element_size()
    per_token, bounded = kv_cache_growth(spec)
    # Per MoE layer: a GGUF file's kinds vary by layer.
    layer_expert_bytes = [spec.moe.expert_ffn * f.spec_neuron_bytes(spec, size) for f in formats]
    routed_bytes = sum(b * spec.moe.num_experts for b in layer_expert_bytes)
    uniform = len({f.config for f in formats}) <= 1
    return {
        # What each token adds once the windowed / chunked layers' rings are full, and what those hold.
        "kv_cache_bytes_per_token": per_token * size,
        "kv_cache_bytes_bounded": bounded * size,
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "spec": attrs.asdict(spec),
        "total_params": fp.total_params,
        "routed_experts": fp.num_routed_experts,
        # One format for every MoE layer, or None where they differ (`expert_formats` lists them).
        "expert_format": (formats[0] if formats else _dense()).config.as_dict() if uniform else None,
        "expert_formats": [f.config.as_dict() for f in formats],
        "bytes_per_expert": routed_bytes // max(fp.num_routed_experts, 1),  # in its format, scales included (a mean)
        "routed_expert_bytes": routed_bytes,
        "resident_bytes": fp.resident_params * size,
    }


def text(report: dict) -> str:
    spec, moe, gib = report["spec"], report["spec"]["moe"], 2**30
    kinds = spec["layer_kinds"]
    mla = spec["mla"]
    heads = (f"{spec['num_heads']} heads, latent attention (rank {mla['kv_lora_rank']} + rotary {mla['qk_rope_head_dim']})"
             if mla else f"{spec['num_heads']} heads / {spec['num_kv_heads']} KV")
    if spec["norm"] == "layer":
        heads += ", LayerNorm"
    if spec["attention_sinks"]:
        heads += " with sinks"
    windows = [w for w in spec["layer_windows"] if w is not None]
    if windows:
        heads += f", window {max(windows)} on {len(windows)} layers"
    chunks = [c for c in spec["layer_chunks"] if c is not None]
    if chunks:
        heads += f", chunks of {max(chunks)} on {len(chunks)} layers"
    if spec["layer_rope"] and not all(spec["layer_rope"]):
        heads += f", no rotation on {spec['layer_rope'].count(False)} layers"
    lines = [
        f"{report['model']}: {spec['model_type']}, {len(kinds)} layers ({kinds.count('moe')} MoE, "
        f"{kinds.count('dense')} dense), D {spec['hidden_size']}, {heads}, {report['total_params'] / 1e9:.3f} B params"
    ]
    if moe:
        router = moe["router"]
        rule = router["kind"] + (" (renormalised)" if router["renormalize"] else "")
        if router["groups"] > 1:
            rule += f", best {router['top_groups']} of {router['groups']} groups"
        if router["scaling"] != 1.0:
            rule += f", × {router['scaling']:g}"
        if router["logit_bias"]:
            rule += ", logit bias"
        if router["weighs_input"]:
            rule += ", weighing the expert's input"
        act = moe["activation"]
        if (act["alpha"], act["limit"], act["up_offset"]) != (1.0, None, 0.0):
            limit = f", limit {act['limit']:g}" if act["limit"] is not None else ""
            rule += f"; SwiGLU with alpha {act['alpha']:g}{limit}, up + {act['up_offset']:g}"
        if moe["expert_bias"]:
            rule += ", expert biases"
        lines.append(
            f"experts: {moe['num_experts']} per MoE layer, top-{moe['top_k']}, F {moe['expert_ffn']}, router {rule}"
            + (f", shared expert F {moe['shared_expert_ffn']}" if moe["shared_expert_ffn"] else "")
        )
    if report["expert_format"] is not None:
        fmt = _label(report["expert_format"])
    else:
        counts = Counter(_label(f) for f in report["expert_formats"])
        fmt = "per-layer " + " + ".join(f"{label} on {n} layers" for label, n in counts.items())
    lines.append(
        f"{report['dtype']}{'' if fmt == 'dense' else f', {fmt} experts'}: {report['routed_experts']} routed experts x {report['bytes_per_expert'] / 2**20:.2f} MiB"
        f" = {report['routed_expert_bytes'] / gib:.3f} GiB offloadable; {report['resident_bytes'] / gib:.3f} GiB resident;"
        f" KV cache {report['kv_cache_bytes_per_token'] / 2**10:.1f} KiB per token"
        + (f" + {report['kv_cache_bytes_bounded'] / 2**20:.1f} MiB for the windowed / chunked layers' spans"
           if report["kv_cache_bytes_bounded"] else "")
    )
    return "\n".join(lines)


def _label(node: dict) -> str:
    """A format's name and knobs: `int4 (group_size 64, symmetric True)`."""
    knobs = {k: v for k, v in node.items() if k != "name"}
    return node["name"] + (f" ({', '.join(f'{k} {v}' for k, v in knobs.items())})" if knobs else "")


def _dense():
    from moepic.quant import build_format

    return build_format("dense")
