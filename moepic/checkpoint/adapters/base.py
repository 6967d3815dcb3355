"""What an architecture adapter is: the one interface the loader (checkpoint/load.py) and the
simulator's presets (sim/shapes.py) call. An adapter turns a config.json into a pure `ModelSpec`
and a checkpoint's tensors into `ModelWeights`; it never computes. A family whose files follow the
Llama naming scheme subclasses `LlamaLikeAdapter` (llama_like.py) and mostly writes `spec`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from moepic.checkpoint.adapters.reader import TensorReader
    from moepic.checkpoint.hf_config import HFConfig
    from moepic.core.spec import ModelSpec
    from moepic.core.weights import ModelWeights


class Adapter(ABC):
    # The Hugging Face `model_type` values it reads (registered in adapters/__init__.py).
    model_types: ClassVar[tuple[str, ...]] = ()
    # The `quantization_config.quant_method` values its reader decodes (checkpoint/load.py refuses others).
    quantizations: ClassVar[tuple[str, ...]] = ()
    # Tensors it never reads and the loader should not call unexpected (a multimodal file's vision tower).
    ignored_prefixes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def spec(self, cfg: HFConfig) -> ModelSpec:
        """The model's shape and rules from its config.json; what the core cannot honour raises a
        CheckpointError naming the key (never a silently different model)."""

    @abstractmethod
    def load_weights(self, read: TensorReader, spec: ModelSpec, progress: bool) -> ModelWeights:
        """Every tensor of the model for `spec`, read through `read` (dtype, device, and where routed
        experts go: `TensorReader.place_routed_expert`)."""
