"""Supervised fine-tuning of a causal LM with the fused TOFU loss, against cross-entropy.

    python examples/sft.py                       # tiny model + shipped data, CPU, 1-2 minutes
    python examples/sft.py --model Qwen/Qwen2.5-0.5B --data my.jsonl --bf16 --loss tofu

By default a tiny Llama (config embedded below, random init) learns the instruction data set in
``examples/data/instructions.jsonl`` with a byte-level BPE tokenizer trained on it in a second:
nothing is downloaded. It trains twice, with TOFU and with cross-entropy (the same fused kernel at
``gamma=0, beta=1``, which is exactly cross-entropy, so the two runs differ only by the loss), then
prints loss, tokens/s, peak memory and the kernel's statistics (entropy, mean target probability)
and plots the loss, entropy and mean-probability curves of every run saved in ``--out`` (default
``examples/runs/sft/sft_curves.png``).

``--model`` takes a local directory or Hugging Face model id (``from_pretrained``, with its own
tokenizer) or a ``config.json`` (random init, the BPE tokenizer). ``--data`` takes JSONL rows with
``instruction``/``response`` or ``prompt``/``completion`` fields (the loss covers the response) or
``text`` (the loss covers all of it). ``--trainer trl`` trains through TRL's ``SFTTrainer``
(``tofu_kernels.hf.TOFUSFTTrainer``) instead of ``transformers.Trainer``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments

from tofu_kernels.hf import apply_tofu_kernel, get_tofu_stats

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "data" / "instructions.jsonl"
DEFAULT_OUT = HERE / "runs" / "sft"
# The default model: small enough to learn the shipped data on two CPU cores in about a minute.
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
TEMPLATE = "### Instruction:\n{instruction}\n### Response:\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model directory or id, or a config.json (default: tiny Llama)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL training data")
    p.add_argument("--loss", choices=["tofu", "ce", "both"], default="both")
    p.add_argument("--gamma", type=float, default=3.0, help="TOFU focal exponent")
    p.add_argument("--beta", type=float, default=0.8, help="TOFU temperature")
    p.add_argument("--trainer", choices=["hf", "trl"], default="hf")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="default: 3e-3 from scratch, 2e-5 for --model")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512, help="of the BPE tokenizer trained here")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--impl",
        choices=["auto", "triton", "chunked", "vocab_chunked", "fused", "torch"],
        default="auto",
        help="the loss's impl (all but torch: GPU, or CPU under TRITON_INTERPRET=1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="histories and plot")
    args = p.parse_args(argv)
    if args.lr is None:
        pretrained = args.model and not args.model.endswith(".json")
        args.lr = 2e-5 if pretrained else 3e-3
    return args


# -------------------------------------------------------------------------------------------
# Data and model
# -------------------------------------------------------------------------------------------


def load_rows(path: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs; the loss covers the response."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "instruction" in r:
            rows.append((TEMPLATE.format(instruction=r["instruction"]), r["response"]))
        elif "prompt" in r:
            rows.append((r["prompt"], r["completion"]))
        else:
            rows.append(("", r["text"]))
    if not rows:
        raise SystemExit(f"no rows in {path}")
    return rows


def train_bpe(rows: list[tuple[str, str]], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the data in memory (a second, no download)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    special = ["<pad>", "<s>", "</s>"]
    bpe.train_from_iterator(
        (p + r for p, r in rows), vocab_size=vocab_size, special_tokens=special, show_progress=False
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def load_model_and_tokenizer(args: argparse.Namespace, rows: list[tuple[str, str]]):
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model and not args.model.endswith(".json"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        tokenizer = train_bpe(rows, args.vocab_size)
        special = dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if args.model:
            config = transformers.AutoConfig.from_pretrained(args.model)
            for key, value in special.items():
                setattr(config, key, value)
        else:
            config = transformers.LlamaConfig(**TINY_LLAMA, **special)
        torch.manual_seed(args.seed)  # the same initial weights for every run
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tokenize(rows, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    eos = tokenizer.eos_token or ""
    out = []
    for prompt, response in rows:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        r = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out


class Collator:
    """Right-pads a batch: pad id in the inputs, -100 in the labels, 0 in the mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            pad = n - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad_id] * pad)
            batch["labels"].append(r["labels"] + [-100] * pad)
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}


# -------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------


class Curves(TrainerCallback):
    """A progress bar, and per step the loss and the kernel's statistics."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.history: dict[str, list[float]] = {"step": [], "loss": [], "entropy": [], "mean_p": []}
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.label, dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        stats = get_tofu_stats(model)
        self.history["step"].append(state.global_step)
        self.history["loss"].append(float(logs["loss"]))
        self.history["entropy"].append(float(stats.entropy) if stats else math.nan)
        self.history["mean_p"].append(float(stats.mean_p) if stats else math.nan)
        self.bar.set_postfix(
            loss=f"{logs['loss']:.3f}", entropy=f"{self.history['entropy'][-1]:.2f}"
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def counting(base: type) -> type:
    """``base`` (a Trainer class) counting the non-padding tokens it trains on."""

    class CountingTrainer(base):
        tokens_seen = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training and "attention_mask" in inputs:
                self.tokens_seen += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *args, **kwargs)

    return CountingTrainer


def train_one(args: argparse.Namespace, loss: str, rows, scratch: str) -> dict:
    gamma, beta = (args.gamma, args.beta) if loss == "tofu" else (0.0, 1.0)
    label = f"tofu (gamma={gamma:g}, beta={beta:g})" if loss == "tofu" else "cross-entropy"
    model, tokenizer = load_model_and_tokenizer(args, rows)
    # The one call: training forwards with labels now compute fused TOFU, logits never built.
    apply_tofu_kernel(model, gamma=gamma, beta=beta, impl=args.impl)

    cuda = torch.cuda.is_available()
    common = dict(
        output_dir=scratch,  # nothing is saved: no checkpoints
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # the Curves callback draws the bar
        bf16=args.bf16,
        use_cpu=not cuda,
        seed=args.seed,
        data_seed=args.seed,
    )
    if args.gradient_checkpointing:
        # transformers 5.25 renamed the option (the old name warns); older ones know the old one
        fields = TrainingArguments.__dataclass_fields__
        new = "activation_checkpointing" in fields
        common["activation_checkpointing" if new else "gradient_checkpointing"] = True
    curves = Curves(label)
    if args.trainer == "trl":
        import datasets
        import trl

        from tofu_kernels.hf import TOFUSFTTrainer

        data = datasets.Dataset.from_list([{"prompt": p, "completion": r} for p, r in rows])
        config = trl.SFTConfig(max_length=args.max_length, **common)
        trainer = counting(TOFUSFTTrainer)(
            model=model, args=config, train_dataset=data, processing_class=tokenizer
        )
    else:
        trainer = counting(Trainer)(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=tokenize(rows, tokenizer, args.max_length),
            data_collator=Collator(tokenizer.pad_token_id),
        )
    # Our bar replaces the Trainer's printing of every log line.
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.add_callback(curves)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    stats = get_tofu_stats(model)
    tail = curves.history["loss"][-10:]
    result = {
        "label": label,
        "loss": loss,
        "gamma": gamma,
        "beta": beta,
        "final_loss": sum(tail) / len(tail),
        "tokens_per_s": trainer.tokens_seen / seconds,
        "seconds": seconds,
        "peak_memory_gb": peak_memory_gb(cuda),
        "peak_memory_kind": "GPU allocated" if cuda else "process RSS",
        "stats": stats.as_dict() if stats else {},
        "history": curves.history,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"history_{loss}.json").write_text(json.dumps(result, indent=1))
    return result


def peak_memory_gb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def report(results: list[dict]) -> None:
    print()
    head = f"{'run':<28} {'loss':>7} {'tokens/s':>9} {'peak mem':>9} {'entropy':>8} {'mean p':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        s = r["stats"]
        print(
            f"{r['label']:<28} {r['final_loss']:>7.3f} {r['tokens_per_s']:>9.0f} "
            f"{r['peak_memory_gb']:>7.2f}GB {s.get('entropy', math.nan):>8.3f} "
            f"{s.get('mean_p', math.nan):>7.3f}"
        )
    print(f"(loss: mean of the last 10 steps; peak memory: {results[0]['peak_memory_kind']})")


def smooth(values: list[float], alpha: float = 0.15) -> list[float]:
    """Exponential moving average, so the curves can be told apart."""
    out, avg = [], None
    for v in values:
        avg = v if avg is None else alpha * v + (1 - alpha) * avg
        out.append(avg)
    return out


def plot(out: Path) -> Path | None:
    """Loss, entropy and mean target probability of every run saved in ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return None
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("history_*.json"), reverse=True)]
    panels = [
        ("loss", "training loss (each run's own loss)", "loss"),
        ("entropy", "predictive entropy", "nats"),
        ("mean_p", "mean target probability", "p"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for r in runs:
        h, color = r["history"], {"tofu": "C0", "ce": "C1"}[r["loss"]]
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            ax.plot(h["step"], h[key], color=color, alpha=0.25, linewidth=0.8)
            ax.plot(h["step"], smooth(h[key]), color=color, label=r["label"])
    for ax, (_, title, unit) in zip(axes, panels, strict=True):
        ax.set(title=title, xlabel="step", ylabel=unit)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "sft_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = load_rows(args.data)
    losses = ["tofu", "ce"] if args.loss == "both" else [args.loss]
    with tempfile.TemporaryDirectory() as scratch:
        results = [train_one(args, loss, rows, scratch) for loss in losses]
    report(results)
    path = plot(Path(args.out))
    if path:
        print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
