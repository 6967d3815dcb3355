"""Quantized weight formats, pure: how a matrix is stored in fewer bits and read back.

These are the formats' arithmetic (quantize, pack, dequantize), each checked against its
specification; what stores routed experts in them end to end (host store, device slots, the split
aligned to whole groups) builds on them (issue 19). MXFP4, as GPT-OSS checkpoints ship it, lives
with the checkpoint reader (moepic/checkpoint/mxfp4.py).
"""
