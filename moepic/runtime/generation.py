"""The generation loop: prefill, then decode token by token until EOS or the token limit.

Side effects: wall-clock timing and an optional progress bar. Numbers come from the pure core
(`forward`, `sample_next_token`); this module only drives them and measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import attrs
import torch

from moepic.config import SamplingConfig
from moepic.core.model import KVCache, Model, forward
from moepic.core.moe import ExpertSource, RoutingTap
from moepic.core.rope import cache_rebuild_length
from moepic.core.sampling import sample_next_token
from moepic.progress import bar as progress_bar


@attrs.frozen(kw_only=True)
class GenerationStats:
    prompt_tokens: int
    tokens: int  # new tokens generated
    prefill_s: float
    decode_s: float  # the decode steps only (tokens after the first)

    @property
    def decode_s_per_token(self) -> float:
        steps = self.tokens - 1
        return self.decode_s / steps if steps > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return attrs.asdict(self) | {"decode_s_per_token": self.decode_s_per_token}


@attrs.frozen(kw_only=True)
class GenerationResult:
    token_ids: list[int]
    stats: GenerationStats
    stopped_on_eos: bool
    # Logits that chose each new token (only when asked for: they cost memory).
    logits: list[torch.Tensor] | None = None


def next_token(logits_V: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """The next id as `sampling` picks it from `logits_V` (a 0-d tensor: reading it syncs the device)."""
    return sample_next_token(logits_V, greedy=sampling.greedy, temperature=sampling.temperature, top_p=sampling.top_p,
                             generator=generator)


def stop_ids(model: Model, eos_ids: Sequence[int] | None) -> set[int]:
    """The ids that end a generation: the ones given, else the model's EOS ids."""
    return set(model.spec.eos_token_ids if eos_ids is None else eos_ids)


def rebuild(model: Model, ids: Sequence[int], cache: KVCache, experts, *, tap=None) -> tuple[torch.Tensor, KVCache]:
    """The whole sequence `ids` run again from an empty cache (`cache_rebuild_length`: a rope scale
    the cached keys carry has changed): the last position's logits [V], and the refilled cache."""
    everything_T = torch.tensor(list(ids), dtype=torch.long, device=model.device)
    logits_TV, cache = forward(model, everything_T, attrs.evolve(cache, length=0), experts, logits_for="last", tap=tap)
    return logits_TV[-1], cache


def check_prefill_chunk(model: Model, prefill_chunk: int | None) -> None:
    """A prefill chunk is a positive size, for a model whose rope keeps one scale across a prompt."""
    if prefill_chunk is None:
        return
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if cache_rebuild_length(model.spec.rope, model.rope_scaling) is not None:
        raise ValueError("prefill_chunk: this model's rope (LongRoPE) changes scale within a sequence, which a prompt "
                         "prefilled in pieces would mix; prefill its prompts whole")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: Model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(greedy=True),
    eos_ids: Sequence[int] | None = None,
    experts: ExpertSource | None = None,
    keep_logits: bool = False,
    progress: bool = False,
    on_token: Callable[[int], None] | None = None,
    tap: RoutingTap | None = None,
    prefill_chunk: int | None = None,
) -> GenerationResult:
    """Greedy or seeded sampling; stops at max_new_tokens or after emitting an EOS id.

    `on_token` sees each new id as soon as it is chosen (for streaming output); its time counts
    in the decode timing, so keep it cheap. `prefill_chunk`: the prompt goes through in pieces of
    at most that many tokens (as a server interleaves a long prompt with others' decode steps:
    runtime/scheduler.py), which rounds otherwise than one piece.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_prefill_chunk(model, prefill_chunk)
    eos = stop_ids(model, eos_ids)
    device = model.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = KVCache.allocate(model, len(prompt_ids) + max_new_tokens)
    if experts is not None:
        experts.begin_request()
    tokens_T = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)

    def sample(logits_V: torch.Tensor, cache: KVCache):
        return logits_V, next_token(logits_V, sampling, generator), cache

    def step(tokens: torch.Tensor, cache: KVCache, chunk: int | None = None):
        for piece in tokens.split(chunk or len(tokens)):
            logits_TV, cache = forward(model, piece, cache, experts, logits_for="last", tap=tap)
        return sample(logits_TV[-1], cache)

    rebuild_at = cache_rebuild_length(model.spec.rope, model.rope_scaling)
    kept, new_ids = [], []
    # `with` closes the bar on an exception too, so an error line is not printed after it.
    with progress_bar(total=max_new_tokens, desc="generating", unit="tok", wanted=progress, leave=False) as bar:
        _sync(device)
        t0 = time.perf_counter()
        logits_V, next_id, cache = step(tokens_T, cache, prefill_chunk)
        token = int(next_id)  # the host needs the id anyway (EOS check, next input): this is the sync
        t1 = time.perf_counter()
        while True:
            new_ids.append(token)
            if keep_logits:
                kept.append(logits_V.clone())
            if on_token is not None:
                on_token(token)
            bar.update(1)
            if token in eos or len(new_ids) == max_new_tokens:
                break
            if cache.length == rebuild_at:  # the sequence outgrows a scale the cached keys carry
                logits_V, next_id, cache = sample(*rebuild(model, [*prompt_ids, *new_ids], cache, experts, tap=tap))
            else:
                logits_V, next_id, cache = step(next_id.view(1), cache)
            token = int(next_id)
        t2 = time.perf_counter()
    stats = GenerationStats(prompt_tokens=len(prompt_ids), tokens=len(new_ids), prefill_s=t1 - t0, decode_s=t2 - t1)
    return GenerationResult(
        token_ids=new_ids, stats=stats, stopped_on_eos=new_ids[-1] in eos, logits=kept if keep_logits else None
    )
