"""Architecture adapters, one per file, registered by Hugging Face `model_type`.

Adding an architecture: write `adapters/NAME.py` with an `Adapter` (base.py: `model_types`,
`spec(cfg)`, `load_weights(...)`; subclass LlamaLikeAdapter when the file layout is Llama-like),
then add it to `_ADAPTERS` below.
"""

from moepic.checkpoint.adapters.base import Adapter
from moepic.checkpoint.adapters.deepseek import DeepseekAdapter, Glm4MoeAdapter
from moepic.checkpoint.adapters.dots1 import Dots1Adapter
from moepic.checkpoint.adapters.ernie import ErnieMoeAdapter
from moepic.checkpoint.adapters.gpt_oss import GptOssAdapter
from moepic.checkpoint.adapters.granite import GraniteMoeAdapter
from moepic.checkpoint.adapters.hunyuan import HunyuanMoeAdapter
from moepic.checkpoint.adapters.llama4 import Llama4Adapter, Llama4TextAdapter
from moepic.checkpoint.adapters.minimax_m2 import MiniMaxM2Adapter
from moepic.checkpoint.adapters.mixtral import MixtralAdapter
from moepic.checkpoint.adapters.olmoe import FlexOlmoAdapter, OlmoeAdapter
from moepic.checkpoint.adapters.phimoe import PhimoeAdapter
from moepic.checkpoint.adapters.qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter
from moepic.errors import CheckpointError

_ADAPTERS: dict[str, Adapter] = {
    model_type: adapter
    for adapter in (
        MixtralAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter(), OlmoeAdapter(), DeepseekAdapter(), Glm4MoeAdapter(),
        Dots1Adapter(), MiniMaxM2Adapter(), GraniteMoeAdapter(), ErnieMoeAdapter(), GptOssAdapter(),
        PhimoeAdapter(), Llama4TextAdapter(), Llama4Adapter(), HunyuanMoeAdapter(),
        FlexOlmoAdapter(),
    )
    for model_type in adapter.model_types
}

# MoE families moepic knows and does not run, and why: the error says so instead of only "unsupported".
_REFUSED = {
    "qwen3_next": "its linear-attention (Gated DeltaNet) layers are not supported",
    "qwen3_5_moe": "its linear-attention (Gated DeltaNet) layers are not supported",
    "jamba": "its Mamba (state-space) layers are not supported",
    "lfm2_moe": "its short-convolution layers are not supported",
    "granitemoehybrid": "its Mamba (state-space) layers are not supported",
}


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model_type: str, source: str) -> Adapter:
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        why = f": {_REFUSED[model_type]}" if model_type in _REFUSED else ""
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r}{why}; supported: {', '.join(supported_model_types())}"
        ) from None
