"""Small builders shared by tests."""

from __future__ import annotations

import torch

from moepic.cli import main
from moepic.core.weights import SwiGLUWeights


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
