"""A weight holding NaN or Inf is refused as it loads, by file and tensor name; --no-check-weights skips that.

Without the check such a model loads, samples from NaN logits (a crash) or, with --greedy, exits 0
printing token 0 over and over.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.torch import load_file, save_file

from moepic.checkpoint.files import all_finite
from moepic.checkpoint.load import load_model
from moepic.cli import main
from moepic.errors import CheckpointError
from tests_support import cli_error

ARGS = ["generate", "--json", "--greedy", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
ATTENTION = "model.layers.1.self_attn.q_proj.weight"
EXPERT = "model.layers.2.block_sparse_moe.experts.3.w2.weight"


def _copy_with(checkpoint_dir, tmp_path, name: str, tensor: str, value: float, at=(3, 4)):
    """A copy of checkpoint `name` whose `tensor` holds `value` at `at`; returns (folder, file)."""
    folder = tmp_path / name
    shutil.copytree(checkpoint_dir(name), folder)
    path = next(p for p in folder.glob("*.safetensors") if tensor in load_file(p))
    tensors = load_file(path)
    tensors[tensor][at] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return folder, path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor", [ATTENTION, EXPERT], ids=["attention", "routed-expert"])
@pytest.mark.parametrize("offloaded", [False, True], ids=["dense", "offloaded"])
def test_non_finite_weight_is_named_with_its_file(checkpoint_dir, capsys, tmp_path, value, tensor, offloaded):
    folder, path = _copy_with(checkpoint_dir, tmp_path, "mixtral", tensor, value)
    budget = ["--budget", "0.5"] if offloaded else []
    message = cli_error(capsys, [*ARGS, "--model", str(folder), *budget])
    assert message == f"{path}: tensor {tensor!r} has 1 NaN or Inf value(s)"


def test_non_finite_weight_in_a_shard_names_that_shard(checkpoint_dir, capsys, tmp_path):
    folder, path = _copy_with(checkpoint_dir, tmp_path, "mixtral_sharded", EXPERT, float("nan"), at=(0, 0))
    assert path.name != "model.safetensors"
    assert cli_error(capsys, [*ARGS, "--model", str(folder)]) == f"{path}: tensor {EXPERT!r} has 1 NaN or Inf value(s)"


def test_a_value_that_overflows_the_load_dtype_is_named(checkpoint_dir, capsys, tmp_path):
    # Finite in the float32 file, Inf once cast to float16 (whose largest value is 65504).
    folder, path = _copy_with(checkpoint_dir, tmp_path, "mixtral", ATTENTION, 1e6)
    message = cli_error(capsys, [*ARGS, "--model", str(folder), "--dtype", "float16"])
    assert message == f"{path}: tensor {ATTENTION!r} has 1 value(s) too large for float16 (load it in a wider dtype)"
    assert main([*ARGS, "--model", str(folder), "--dtype", "float32"]) == 0


def test_no_check_weights_skips_the_check(checkpoint_dir, capsys, tmp_path):
    folder, _ = _copy_with(checkpoint_dir, tmp_path, "mixtral", ATTENTION, float("nan"))
    assert main([*ARGS, "--model", str(folder)]) == 2
    assert main([*ARGS, "--model", str(folder), "--no-check-weights"]) == 0
    assert main([*ARGS, "--model", str(folder), "model.check_weights=false"]) == 0


def test_load_model_checks_by_default_and_can_skip(checkpoint_dir, tmp_path):
    folder, _ = _copy_with(checkpoint_dir, tmp_path, "mixtral", EXPERT, float("inf"))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_model(folder, offload_experts=True)
    model = load_model(folder, check_weights=False)
    assert not all_finite(model.weights.layers[2].ffn.experts[3].down_FD)


_VALUES = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([3e38, -3e38, 6e4, 1e5]),  # sums of these overflow float32 / float16 while each is finite
)


@given(
    values=arrays("float32", st.integers(0, 64), elements=_VALUES),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_all_finite_agrees_with_isfinite_on_every_element(values, dtype):
    # The fast path decides from one sum; this holds it to the elementwise definition, overflow included.
    tensor = torch.from_numpy(values).to(dtype)
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())
