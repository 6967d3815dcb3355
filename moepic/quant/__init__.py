"""Quantized weights, pure: the formats' arithmetic (groups.py: integer groups; e4m3.py: FP8;
mx.py: MXFP4 as GPT-OSS ships it; ggml.py: GGUF's blocks) and the expert formats built on it, the
one seam through which the host store, the device cache, staging, the split, the layout and the
latency model see how a routed expert is stored (format.py). Importing this package registers every
expert format.
"""

from moepic.quant import dense, fp8, gguf_format, int4, int4_fused, int8, mxfp4  # noqa: F401  (registration)
from moepic.quant.format import EXPERT_FORMATS, ExpertFormat, FormatConfig, QuantizedExpert, build_format, format_of

__all__ = ["EXPERT_FORMATS", "ExpertFormat", "FormatConfig", "QuantizedExpert", "build_format", "format_of"]
