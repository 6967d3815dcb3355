"""GGUF's block quantizations, as llama.cpp stores weights: Q8_0 and the k-quants of a Q4_K_M file
(Q4_K, Q6_K), dequantised in torch on any device. Pure.

Each row of a weight is cut into blocks along its input dimension; a block is bytes:

    Q8_0  32 weights,  34 bytes: d (float16) | 32 int8 codes                    w = d·q
    Q4_K 256 weights, 144 bytes: d, dmin (float16) | 12 bytes of 6-bit scales and
                                 mins for 8 sub-blocks of 32 | 128 bytes of 4-bit codes
                                                                                 w = (d·sc)·q − dmin·m
    Q6_K 256 weights, 210 bytes: 128 bytes of low nibbles | 64 of high 2-bit pairs |
                                 16 int8 scales for sub-blocks of 16 | d (float16) w = (d·sc)·(q − 32)

GGUF's MXFP4 (GPT-OSS's experts) is not dequantised here: `mxfp4_as_mx` turns its 17-byte
blocks into the OCP / Hugging Face layout the `mxfp4` expert format keeps (quant/mx.py).

The arithmetic follows the `gguf` package's reference (float32, in its order), so the weights are
its bit for bit (tests/quant/test_ggml.py); so is Q8_0's encoder (`quantize_q8_0`). The `gguf`
expert format (quant/gguf_format.py) keeps experts as these blocks.
"""

from __future__ import annotations

import torch

QK_K = 256
BLOCKS = {"Q8_0": (32, 34), "Q4_K": (QK_K, 144), "Q6_K": (QK_K, 210)}  # (weights, bytes) per block


def dequantize_ggml(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """[n, bytes] uint8 blocks of `kind` → [n, weights] float32."""
    weights, nbytes = block_shape(kind)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != nbytes:
        raise ValueError(f"{kind} blocks are [n, {nbytes}] uint8, got {list(blocks.shape)} {blocks.dtype}")
    return {"Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}[kind](blocks)


MXFP4_BLOCK = (32, 17)  # GGUF's MXFP4: an E8M0 scale byte, then 16 bytes of E2M1 codes


def mxfp4_as_mx(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF MXFP4 rows [..., G·17] uint8 → (codes [..., G, 16], scales [..., G]) as OCP / Hugging
    Face lay them out: the same E2M1 codes and E8M0 scales (llama.cpp doubles its value table and
    halves the scale: the same values), byte j holding values 2j and 2j+1 instead of j and j+16."""
    weights, nbytes = MXFP4_BLOCK
    if blocks.dtype != torch.uint8 or blocks.shape[-1] % nbytes:
        raise ValueError(f"MXFP4 rows are whole {nbytes}-byte blocks of uint8, got {list(blocks.shape)} {blocks.dtype}")
    b = blocks.reshape(*blocks.shape[:-1], -1, nbytes)
    codes = torch.cat((b[..., 1:] & 0x0F, b[..., 1:] >> 4), dim=-1)  # values 0..31 in order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), b[..., 0].contiguous()


def block_shape(kind: str) -> tuple[int, int]:
    """(weights, bytes) of one block of `kind`, or a ValueError naming the kinds read."""
    if kind not in BLOCKS:
        raise ValueError(f"GGUF block type {kind!r} is not read; read: {', '.join(BLOCKS)}")
    return BLOCKS[kind]


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """[n, 32] weights → [n, 34] Q8_0 blocks, as llama.cpp quantizes them: d = max|x| / 127 in
    float32, codes x / d rounded half away from zero, d stored as float16."""
    x = x.float()
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = _round_half_away(x * inverse).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), codes.view(torch.uint8)], dim=1)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _half(b: torch.Tensor) -> torch.Tensor:
    """Two bytes a row → [n, 1] float32 (float16 little-endian, as the blocks store it)."""
    return b.contiguous().view(torch.float16).float()


def _shifts(*amounts: int, device) -> torch.Tensor:
    return torch.tensor(amounts, dtype=torch.uint8, device=device)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks[:, :2])


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _half(blocks[:, 0:2]), _half(blocks[:, 2:4])
    sc, m = _scale_min(blocks[:, 4:16])
    d_sub = (d * sc.float()).view(n, 8, 1)
    dm_sub = (dmin * m.float()).view(n, 8, 1)
    # 4 chunks of 32 bytes: the low nibbles are one sub-block, the high nibbles the next
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> _shifts(0, 4, device=blocks.device).view(1, 1, 2, 1)
    qs = (qs & 0x0F).reshape(n, 8, 32).float()
    return (d_sub * qs - dm_sub).reshape(n, QK_K)


def _scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes → 8 six-bit scales and 8 six-bit mins: bytes 0-3 hold scales 0-3 (low 6
    bits), 4-7 mins 0-3; bytes 8-11 hold scales 4-7 and mins 4-7 as nibbles, their top 2 bits in the
    top bits of bytes 0-3 and 4-7."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mins


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_half(blocks[:, 208:210]) * scales).view(n, QK_K // 16, 1)
    low = (ql.reshape(n, 2, 1, 64) >> _shifts(0, 4, device=blocks.device).view(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=blocks.device).view(1, 1, 4, 1)) & 0x03
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, 16).float()).reshape(n, QK_K)
