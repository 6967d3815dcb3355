"""One layer's KV cache: where new keys and values go, and which cached ones the new queries see.
Pure, apart from writing the new keys into the donated buffers.

A layer that attends to every earlier position keeps them all, token p at slot p. A layer that sees
a bounded span (a sliding window, or its chunk: `ModelSpec.window` / `chunk`) needs at most `span`
of them, so its buffer holds `span` slots and token p lives at slot p mod span, a ring: GPT-OSS's
window-128 layers keep 128 positions at any context length, not all of them. Attention does not
care in which order keys come, only which it may see, so the ring is read in slot order with a
mask built from each slot's position.

    decode (1 token):  write slot p mod R, attend over the filled slots
    prefill (T tokens): attend over [filled slots | the T new keys], then write the newest ≤ R of them

(In a prefill, a new key may overwrite a slot whose key an earlier new query still needs, so the
new keys are written after attending.) Buffers may keep `reserved` leading slots for the attention
kind (a sink's zero key), which come first in what is read.
"""

from __future__ import annotations

import torch

from moepic.core.spec import ModelSpec


def span_of(spec: ModelSpec, layer: int) -> int | None:
    """The most positions `layer`'s queries can see (its window or chunk); None: every earlier one."""
    spans = [s for s in (spec.window(layer), spec.chunk(layer)) if s is not None]
    return min(spans) if spans else None


def cache_positions(spec: ModelSpec, layer: int, max_length: int) -> int:
    """Slots `layer`'s cache needs for sequences of up to `max_length` tokens."""
    span = span_of(spec, layer)
    return max_length if span is None else min(span, max_length)


def allowed_positions(q_T: torch.Tensor, k_S: torch.Tensor, window: int | None, chunk: int | None) -> torch.Tensor:
    """Boolean [T, S]: which key positions each query position may attend to (causal, within
    `window`, within its own `chunk`)."""
    q, k = q_T[:, None], k_S[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    if chunk is not None:
        allowed &= (k // chunk) == (q // chunk)
    return allowed


def causal_mask(T: int, start: int, window: int | None, device, chunk: int | None = None) -> torch.Tensor | None:
    """Boolean [T, start+T] mask (True = may attend) over every position in order, or None when
    SDPA's own modes suffice (plain causal from position 0, or one query)."""
    if window is None and chunk is None and (T == 1 or start == 0):
        return None
    return allowed_positions(torch.arange(start, start + T, device=device), torch.arange(start + T, device=device),
                             window, chunk)


def remember(
    cache_k_HSd: torch.Tensor, cache_v_HSd: torch.Tensor, k_HTd: torch.Tensor, v_HTd: torch.Tensor,
    start: int, spec: ModelSpec, layer: int, reserved: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Store the new tokens' keys and values (positions start…start+T-1) and return what the new
    queries attend over: (keys, values) with the reserved slots first, and a boolean [T, S'] mask
    over the token slots (S' of them), or None where plain causal attention over positions
    0…start+T-1 in order is meant (SDPA's own causal mode, or nothing at all for one token)."""
    T, device = k_HTd.shape[1], k_HTd.device
    span = span_of(spec, layer)
    if span is None:
        end = reserved + start + T
        cache_k_HSd[:, reserved + start : end] = k_HTd
        cache_v_HSd[:, reserved + start : end] = v_HTd
        return cache_k_HSd[:, :end], cache_v_HSd[:, :end], causal_mask(T, start, None, device)
    ring = cache_k_HSd.shape[1] - reserved
    q_T = torch.arange(start, start + T, device=device)
    window, chunk = spec.window(layer), spec.chunk(layer)
    if T == 1:  # the slot it takes held position start - ring, which no new query sees
        slot = reserved + start % ring
        cache_k_HSd[:, slot] = k_HTd[:, 0]
        cache_v_HSd[:, slot] = v_HTd[:, 0]
        filled = min(start + 1, ring)
        end = reserved + filled
        if chunk is None:  # the newest ≤ window positions: all inside the window (no mask, no device sync)
            return cache_k_HSd[:, :end], cache_v_HSd[:, :end], None
        return cache_k_HSd[:, :end], cache_v_HSd[:, :end], allowed_positions(
            q_T, _slot_positions(start + 1, filled, ring, device), window, chunk)
    filled = min(start, ring)
    k_S = torch.cat((_slot_positions(start, filled, ring, device), q_T))
    keys_HSd = torch.cat((cache_k_HSd[:, : reserved + filled], k_HTd), dim=1)
    values_HSd = torch.cat((cache_v_HSd[:, : reserved + filled], v_HTd), dim=1)
    kept = min(T, ring)  # the newest ones: the next tokens' span reaches no further back
    slots_T = reserved + torch.arange(start + T - kept, start + T, device=device) % ring
    cache_k_HSd.index_copy_(1, slots_T, k_HTd[:, T - kept :])
    cache_v_HSd.index_copy_(1, slots_T, v_HTd[:, T - kept :])
    return keys_HSd, values_HSd, allowed_positions(q_T, k_S, window, chunk)


def _slot_positions(length: int, filled: int, ring: int, device) -> torch.Tensor:
    """[filled]: the position each of the first `filled` ring slots holds once `length` tokens are
    stored (the newest `filled` of them, token p in slot p mod ring)."""
    oldest = length - filled
    slots = torch.arange(filled, device=device)
    return oldest + (slots - oldest) % ring
