"""Benchmark: moepic's dense all-resident model against Hugging Face transformers on the CPU.

A script, not a test. It saves one random checkpoint of --arch (Mixtral-, DeepSeek-V3- or GPT-OSS-shaped)
with `save_pretrained` (cached under --workdir), loads it into both engines at each --dtypes, and prints one table of
medians over --repeats: prefill time, decode ms/token, their moepic/HF ratios (< 1: moepic is
faster) and whether the greedy tokens agree.

    checkpoint ─┬─ moepic.load_model ─▶ moepic.generate (its GenerationStats)   ┐ alternated,
                └─ AutoModelForCausalLM ─▶ the same greedy loop written by hand ┘ warm-up first

What is timed, and why it is fair:
- moepic: `generate(model, prompt, max_new_tokens=N, eos_ids=())`; prefill_s is the prompt forward
  plus the first argmax read back to the host, decode_s_per_token the other N-1 steps.
- HF: the same loop by hand: one forward over the prompt (use_cache=True, logits_to_keep=1, as
  generate() does), argmax, then N-1 single-token forwards with the returned cache. That times the
  model, not generate()'s logits processors and stopping criteria, so it is the *faster* HF number
  (the gap to HF generate() end-to-end is printed under the table), and it splits prefill from
  decode exactly where moepic's stats do. Subtracting a separate prefill timing from a generate()
  timing would mix the noise of two runs into every decode number.
- HF runs with its defaults (sdpa attention; the `grouped_mm` experts kernel unless
  --hf-experts says otherwise); the machine line names what it actually used.
- Each repeat runs both engines back to back, swapping which goes first every repeat, so load
  from other processes hits both alike. One untimed warm-up run each comes first.
- `same tokens` compares moepic's greedy tokens with HF's. For float32 the script also checks that
  the hand loop gives the same tokens as HF `generate()`. bfloat16 rounds differently in each
  engine, so a late divergence there is expected and informational.

Run:  python experiments/bench_vs_hf.py            (full: 8 layers, prompt 128, 32 new tokens)
      python experiments/bench_vs_hf.py --arch deepseek_v3
      python experiments/bench_vs_hf.py --arch gpt_oss
      python experiments/bench_vs_hf.py --quick    (smoke test: 2 layers, prompt 16, 8 tokens)
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
from tqdm.auto import tqdm

from moepic.checkpoint.load import load_model
from moepic.default_model import cache_root
from moepic.runtime.generation import generate

# The benchmarked shapes, scaled down to fit two copies in a laptop's memory but keeping each
# family's proportions: arch → (config class, model class, config kwargs).
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=1024, intermediate_size=3584, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=16, num_key_value_heads=8,  # GQA: 2 query heads per KV head
        vocab_size=32000, initializer_range=0.02,
    )),
    # DeepSeek-V3's proportions at 1/7 width: latent attention with low-rank queries (ranks and head
    # dims in V3's ratios), 32 routed experts in 4 groups (top 2 groups), top-8, one shared expert,
    # the first layer dense.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=1024, intermediate_size=2816, moe_intermediate_size=288, n_routed_experts=32, n_shared_experts=1,
        num_experts_per_tok=8, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=224, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, vocab_size=32000, initializer_range=0.02,
    )),
    # GPT-OSS-20B's proportions at 1/3 width: D = F, 32 experts top-4 with biases and the clamped
    # SwiGLU, 8 query heads per KV head with sinks, window-128 and full layers alternating.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        hidden_size=960, intermediate_size=960, num_local_experts=32, num_experts_per_tok=4, head_dim=64,
        num_attention_heads=16, num_key_value_heads=2, sliding_window=128, vocab_size=32000, initializer_range=0.02,
    )),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@attrs.frozen(kw_only=True)
class Run:
    prefill_s: float
    decode_s_per_token: float
    tokens: tuple[int, ...]


@attrs.frozen(kw_only=True)
class Row:
    dtype: str
    moepic: tuple[Run, ...]
    hf: tuple[Run, ...]
    same_tokens: str
    hf_generate_s: float | None  # HF generate() end-to-end, once (float32 only)
    hf_impl: str  # what HF resolved attention and experts to


def checkpoint_folder(workdir: Path, arch: str, layers: int, seed: int) -> Path:
    """The random checkpoint of `arch` for `layers`, saved once with save_pretrained and reused after."""
    import transformers

    config_cls, model_cls, shape = ARCHS[arch]
    target = workdir / f"{arch}-L{layers}-D{shape['hidden_size']}-F{shape['intermediate_size']}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    workdir.mkdir(parents=True, exist_ok=True)
    # Save into a staging folder and rename, so an interrupted save never looks like a checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=workdir))
    try:
        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(num_hidden_layers=layers, **shape)
        getattr(transformers, model_cls)(config).eval().save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_moepic(model, prompt: Sequence[int], new_tokens: int) -> Run:
    result = generate(model, prompt, max_new_tokens=new_tokens, eos_ids=())
    s = result.stats
    return Run(prefill_s=s.prefill_s, decode_s_per_token=s.decode_s_per_token, tokens=tuple(result.token_ids))


def _cache_names(hf_model) -> tuple[str, str]:
    """(forward keyword, output field) of the KV cache: transformers renamed past_key_values to cache."""
    params = inspect.signature(hf_model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


@torch.inference_mode()
def run_hf(hf_model, prompt: Sequence[int], new_tokens: int) -> Run:
    """The greedy loop of moepic.generate, written against HF's forward (see the module docstring)."""
    kw, field = _cache_names(hf_model)
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    t0 = time.perf_counter()
    out = hf_model(input_ids=ids, use_cache=True, logits_to_keep=1)
    next_id = out.logits[0, -1].argmax(-1)
    tokens = [int(next_id)]  # the host read, as in moepic's loop
    t1 = time.perf_counter()
    while len(tokens) < new_tokens:
        out = hf_model(input_ids=next_id.view(1, 1), use_cache=True, logits_to_keep=1, **{kw: getattr(out, field)})
        next_id = out.logits[0, -1].argmax(-1)
        tokens.append(int(next_id))
    t2 = time.perf_counter()
    steps = new_tokens - 1
    return Run(prefill_s=t1 - t0, decode_s_per_token=(t2 - t1) / steps if steps else 0.0, tokens=tuple(tokens))


@torch.inference_mode()
def hf_generate_tokens(hf_model, prompt: Sequence[int], new_tokens: int) -> tuple[tuple[int, ...], float]:
    """HF generate()'s greedy tokens and its wall time: the reference the hand loop must reproduce."""
    t0 = time.perf_counter()
    seq = hf_model.generate(
        torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
    )
    return tuple(seq[0, len(prompt) :].tolist()), time.perf_counter() - t0


def agreement(ours: Sequence[int], theirs: Sequence[int]) -> str:
    if list(ours) == list(theirs):
        return "yes"
    first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    return f"no (from token {first})"


def bench_dtype(folder: Path, dtype_name: str, args, prompt: list[int], bar: tqdm) -> Row:
    import transformers

    dtype = DTYPES[dtype_name]
    bar.set_description(f"{dtype_name}: loading moepic")
    ours = load_model(folder, dtype=dtype)
    bar.update()
    bar.set_description(f"{dtype_name}: loading HF")
    kwargs = {"experts_implementation": args.hf_experts} if args.hf_experts else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    # Run every step: no EOS on either side (moepic gets eos_ids=()).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    bar.update()

    n = args.new_tokens
    bar.set_description(f"{dtype_name}: warm-up")
    run_moepic(ours, prompt, n)
    hf_loop_tokens = run_hf(hf, prompt, n).tokens
    bar.update()

    hf_generate_s = None
    if dtype == torch.float32:
        bar.set_description(f"{dtype_name}: HF generate() reference")
        ref_tokens, hf_generate_s = hf_generate_tokens(hf, prompt, n)
        if ref_tokens != hf_loop_tokens:
            tqdm.write(f"warning: {dtype_name}: the HF hand loop and HF generate() disagree "
                       f"({agreement(hf_loop_tokens, ref_tokens)}); the HF timing may not be comparable",
                       file=sys.stderr)
        bar.update()

    runs: dict[str, list[Run]] = {"moepic": [], "hf": []}
    engines = [("moepic", lambda: run_moepic(ours, prompt, n)), ("hf", lambda: run_hf(hf, prompt, n))]
    for r in range(args.repeats):
        bar.set_description(f"{dtype_name}: repeat {r + 1}/{args.repeats}")
        # Alternate which engine goes first, so a slow phase of the machine lands on both.
        for name, run in engines if r % 2 == 0 else engines[::-1]:
            runs[name].append(run())
        bar.update()

    cfg = hf.config
    return Row(
        dtype=dtype_name,
        moepic=tuple(runs["moepic"]),
        hf=tuple(runs["hf"]),
        same_tokens=agreement(runs["moepic"][0].tokens, runs["hf"][0].tokens),
        hf_generate_s=hf_generate_s,
        hf_impl=f"attention {cfg._attn_implementation}, experts {getattr(cfg, '_experts_implementation', 'n/a')}",
    )


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_line(args, hf_impl: str, load_at_start: float | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    # Other processes on the cores make every parallel op wait for a time slice: show how busy it was.
    load_now = _load_average()
    load = "" if load_now is None else f" | load avg {load_at_start:.1f} at start, {load_now:.1f} at end"
    return (f"machine: {cpu} ({os.cpu_count()} logical CPUs){load} | threads {args.threads} | "
            f"torch {torch.__version__} | transformers {transformers.__version__} | HF {hf_impl}")


def table(rows: Sequence[Row]) -> str:
    def median(values) -> float:
        return statistics.median(values)

    head = ("dtype", "moepic prefill ms", "HF prefill ms", "ratio", "moepic decode ms/tok", "HF decode ms/tok",
            "ratio (moepic/HF)", "same tokens")
    body = []
    for row in rows:
        mp, hp = median(r.prefill_s for r in row.moepic) * 1e3, median(r.prefill_s for r in row.hf) * 1e3
        md = median(r.decode_s_per_token for r in row.moepic) * 1e3
        hd = median(r.decode_s_per_token for r in row.hf) * 1e3
        body.append((row.dtype, f"{mp:.1f}", f"{hp:.1f}", f"{mp / hp:.2f}", f"{md:.1f}", f"{hd:.1f}",
                     f"{md / hd:.2f}" if hd else "-", row.same_tokens))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Timing method: see the module docstring.")
    p.add_argument("--workdir", type=Path, default=cache_root() / "bench_vs_hf",
                   help="where the random checkpoint is saved and reused (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="mixtral", help="the family benchmarked (default: %(default)s)")
    p.add_argument("--layers", type=int, default=8, help="num_hidden_layers (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine, medians shown (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompt (default: %(default)s)")
    p.add_argument("--hf-experts", default=None,
                   help="HF experts_implementation (eager, grouped_mm, batched_mm); default: HF's own choice")
    p.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 layers, prompt 16, 8 new tokens, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.prompt_len, args.new_tokens, args.repeats = 2, 16, 8, 2
    if args.new_tokens < 2 or args.repeats < 1 or args.prompt_len < 1:
        p.error("need --new-tokens >= 2 (decode is timed from the second token), --repeats >= 1, --prompt-len >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()  # HF's deprecation notices would break up the bar
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_at_start = _load_average()

    folder = checkpoint_folder(args.workdir, args.arch, args.layers, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, ARCHS[args.arch][2]["vocab_size"], (args.prompt_len,), generator=g).tolist()

    steps_per_dtype = 3 + args.repeats
    total = sum(steps_per_dtype + (d == "float32") for d in args.dtypes)
    rows = []
    with tqdm(total=total, unit="step", file=sys.stderr) as bar:
        for dtype_name in args.dtypes:
            rows.append(bench_dtype(folder, dtype_name, args, prompt, bar))
            gc.collect()  # free both copies before the next dtype loads: fp32 is ~3 GB each at full size

    print(machine_line(args, rows[0].hf_impl, load_at_start))
    print(f"model: {folder.name} | prompt {args.prompt_len} tokens | {args.new_tokens} new tokens | "
          f"medians of {args.repeats} repeats after 1 warm-up")
    print(table(rows))
    if any(row.dtype != "float32" and row.same_tokens != "yes" for row in rows):
        print("(bfloat16 rounds differently in each engine: on random weights, whose top logits nearly tie, "
              "greedy paths may part)")
    for row in rows:
        if row.hf_generate_s is not None:
            loop = statistics.median(r.prefill_s + r.decode_s_per_token * (args.new_tokens - 1) for r in row.hf)
            print(f"({row.dtype}: HF generate() end-to-end took {row.hf_generate_s * 1e3:.0f} ms once, "
                  f"vs {loop * 1e3:.0f} ms median for the hand loop timed above)")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [attrs.asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
