"""Small builders shared by tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from moepic.cli import main
from moepic.core.weights import SwiGLUWeights
from moepic.tracing import RoutingTrace


def cli_error(capsys, argv) -> str:
    """main(argv) must fail with exit 2, nothing on stdout and one `moepic: error:` line; return the message."""
    capsys.readouterr()  # drop what earlier steps (e.g. building a fixture checkpoint) printed
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("moepic: error: ")
    return err.removeprefix("moepic: error: ").rstrip("\n")


def random_expert(D: int, F: int, seed: int, dtype=torch.float32, block: int | None = None) -> SwiGLUWeights:
    g = torch.Generator().manual_seed(seed)
    return SwiGLUWeights.from_projections(
        torch.randn(F, D, generator=g, dtype=dtype),
        torch.randn(F, D, generator=g, dtype=dtype),
        torch.randn(D, F, generator=g, dtype=dtype) / F**0.5,
        block=block,
    )


def random_expert_set(E: int, D: int, F: int, seed: int) -> list[SwiGLUWeights]:
    return [random_expert(D, F, seed * 1000 + e) for e in range(E)]


def _positions(rng: np.random.Generator, sequence_N: np.ndarray) -> np.ndarray:
    """Increasing positions within each sequence, mostly consecutive, from a random start (as a trace
    cut from a longer run, or a JSONL log that lost some tokens, has them)."""
    steps_N = rng.choice([1, 1, 1, 2], len(sequence_N))
    starts_N = np.r_[True, sequence_N[1:] != sequence_N[:-1]] if len(sequence_N) else np.zeros(0, bool)
    steps_N[starts_N] = rng.integers(0, 3, starts_N.sum())
    cumulative_N = np.cumsum(steps_N)
    return (cumulative_N - np.maximum.accumulate(np.where(starts_N, cumulative_N - steps_N, 0))).astype(np.int32)


@st.composite
def traces(draw):
    N, L, K = draw(st.integers(0, 12)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    E = draw(st.integers(K, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = np.stack([rng.permutation(E)[:K] for _ in range(N * L)]).reshape(N, L, K) if N else np.zeros((0, L, K), int)
    hidden = rng.standard_normal((N, L, 3)).astype(np.float32) if draw(st.booleans()) else None
    sequence_N = np.sort(rng.integers(0, 3, N)).astype(np.int32)
    return RoutingTrace(
        model=draw(st.text(max_size=10)),
        moe_layers=tuple(sorted(rng.choice(40, L, replace=False).tolist())),
        num_experts=E,
        top_k=K,
        expert_ids_NLK=ids.astype(np.int64),
        weights_NLK=rng.random((N, L, K)).astype(np.float32),
        sequence_N=sequence_N,
        position_N=_positions(rng, sequence_N),
        prefill_N=rng.random(N) < 0.5,
        hidden_NLD=hidden,
        source="test",
    )



def policy_for(name: str, trace: RoutingTrace, *, seed: int = 0):
    """The registered cache policy `name` with its default config, for runs on `trace` (a policy
    that reads a trace gets `trace`; a config with a `seed` gets `seed`): a newly registered policy
    needs no edit here."""
    import attrs

    from moepic.policies import POLICIES
    from moepic.policies.base import build_policy_on

    config = POLICIES[name].config()
    if "seed" in attrs.fields_dict(type(config)):
        config = attrs.evolve(config, seed=seed)
    return build_policy_on(config, trace)


class Models(dict):
    """name → loaded model, with a short repr (hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return f"Models({', '.join(self)})"


def load_split_friendly(checkpoint_dir, names) -> Models:
    """Tiny checkpoints in fp32 with neuron blocks of 4, so θ takes many values (F = 16 or 48)."""
    from moepic.checkpoint.load import load_model

    return Models({name: load_model(checkpoint_dir(name), dtype=torch.float32, widest_neuron_block=4) for name in names})


def dense_run(model, prompt, new_tokens):
    """The dense model's greedy run (with logits) and the routing trace it produced."""
    from moepic.runtime.generation import generate
    from moepic.tracing.recorder import RoutingRecorder

    recorder = RoutingRecorder(model.spec, model_name="test")
    result = generate(model, prompt, max_new_tokens=new_tokens, eos_ids=(), keep_logits=True, tap=recorder)
    return result, recorder.trace()


def budget_between_the_minimum_and_everything(model, share: float, staging_experts: int | None = None) -> int:
    """Bytes: the minimum working set (staging) at share 0, all expert bytes at share 1 (or the
    staging alone, if it is larger than all experts)."""
    from moepic.cache.layout import plan_layout

    layout = plan_layout(model.spec, dtype_bytes=model.dtype.itemsize, budget=1.0, theta=0.5, staging_experts=staging_experts)
    return layout.staging_bytes + int(share * max(0, layout.expert_bytes - layout.staging_bytes))


def assert_slots_hold_the_host_bytes(engine) -> None:
    """Every cache slot of an offloading engine holds exactly its expert's top, and no expert twice."""
    from moepic.cache.planner import FREE

    for layer, residency in engine.residency.items():
        pool = engine.pools[layer]
        top = engine.layout.for_layer(layer).top_neurons
        assert len(residency.cache.slots_S) == pool.flat_SX.shape[0] == engine.layout.for_layer(layer).slots
        cached = [e for e in residency.cache.slots_S if e != FREE]
        assert len(cached) == len(set(cached)), "two slots hold the same expert"
        for slot, expert in enumerate(residency.cache.slots_S):
            if expert != FREE:
                host_top = engine.store.experts[layer][expert].neurons(0, top)
                for cached_tensor, host_tensor in zip(pool.slots[slot].tensors, host_top.tensors, strict=True):
                    assert torch.equal(cached_tensor, host_tensor)  # gate/up, down (and gate/up biases)


def mixtral_shaped_trace(folder) -> str:
    """A small Mixtral-shaped synthetic trace (32 MoE layers, 8 experts, top-2, 12 tokens) saved in
    `folder`: at a quarter of the expert bytes most routed experts miss. Its path."""
    from moepic.tracing import save_trace
    from moepic.tracing.synthetic import SyntheticRouting, generate_trace

    routing = SyntheticRouting(num_experts=8, top_k=2, skew=[1.0] * 32, reuse=[1.0] * 32, decay=[0.5] * 32,
                               correlation=[1.0] * 32)
    path = folder / "mixtral.npz"
    save_trace(generate_trace(routing, 12, seed=0, sequences=1), path)
    return str(path)
