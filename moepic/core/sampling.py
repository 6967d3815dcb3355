"""Next-token choice from logits: greedy, or temperature + nucleus (top-p) sampling. Pure.

Randomness comes only from the explicit `torch.Generator`, so a seed reproduces a run.
"""

from __future__ import annotations

import torch


def sample_next_token(
    logits_V: torch.Tensor,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A 0-d int64 tensor on the logits' device."""
    if greedy:
        return logits_V.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs_V = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs_V = nucleus(probs_V, top_p)
    return torch.multinomial(probs_V, 1, generator=generator).squeeze(0)


def nucleus(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalise."""
    sorted_probs, order = torch.sort(probs_V, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs_V).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)
