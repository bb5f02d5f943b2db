"""Patched models under Hugging Face's Trainer and TRL's SFTTrainer (tiny, in memory, no downloads).

``impl="torch"`` throughout: these test the integration (gradient accumulation through
``num_items_in_batch``, the trainers' call paths), not the kernel, and the interpreter would make
a few training steps take minutes.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

from helpers import TINY_LLAMA
from tofu_kernels.hf import apply_tofu_kernel, get_tofu_stats

VOCAB = 64


def tiny_llama(device, vocab=VOCAB, seed=0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": vocab})
    return transformers.LlamaForCausalLM(config).to(device)


def samples(n=8, length=12):
    """Rows with different numbers of valid labels, so per-micro-batch means would differ."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[: 1 + i] = -100  # prompts of growing length
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def first_update(device, tmp_path, batch_size, accumulation):
    model = apply_tofu_kernel(tiny_llama(device), impl="torch")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    Trainer(model=model, args=args, train_dataset=samples(), optimizers=(opt, None)).train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_gradient_accumulation_matches_large_batch(device, tmp_path):
    accumulated = first_update(device, tmp_path, batch_size=2, accumulation=4)
    large = first_update(device, tmp_path, batch_size=8, accumulation=1)
    # The same step by hand: SGD at lr 1 moves the parameters by the gradient of the full batch.
    model = apply_tofu_kernel(tiny_llama(device), impl="torch")
    rows = samples()
    full = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
    model(**full).loss.backward()
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        for update in (accumulated[name], large[name]):
            torch.testing.assert_close(update, p.grad, rtol=1e-4, atol=1e-4 * scale)


def word_tokenizer(texts):
    """A word-level tokenizer trained in memory: nothing to download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


TEXTS = [
    f"question : what is {a} plus {b} ? answer : {a + b} ."
    for a in range(1, 7)
    for b in range(1, 5)
]


def sft_setup(device, tmp_path, max_steps, **overrides):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tokenizer = word_tokenizer(TEXTS)
    model = tiny_llama(device, vocab=len(tokenizer), seed=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    options = dict(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        max_length=32,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    args = trl.SFTConfig(**{**options, **overrides})
    kwargs = dict(args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}))
    return trl, model, tokenizer, kwargs


def test_sft_trainer_trains_with_tofu(device, tmp_path):
    trl, model, tokenizer, kwargs = sft_setup(device, tmp_path, max_steps=12)
    from tofu_kernels.hf import TOFUSFTTrainer

    apply_tofu_kernel(model, gamma=3.0, beta=0.8, impl="torch")
    trainer = TOFUSFTTrainer(model=model, processing_class=tokenizer, **kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 12 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert {"entropy", "mean_p", "focal_weight", "mean_token_accuracy"} <= logs[0].keys()
    assert get_tofu_stats(model) is not None  # the loss came from the patched forward
    metrics = trainer.evaluate(kwargs["train_dataset"].select(range(8)))
    assert math.isfinite(metrics["eval_loss"]) and "eval_mean_p" in metrics


@pytest.mark.parametrize(
    "option", ["label_smoothing_factor", "compute_loss_func", "loss_type", "no_labels_warning"]
)
def test_trainer_options_that_replace_the_loss(device, tmp_path, option):
    """Trainer computes its own loss from logits under label smoothing or a compute_loss_func
    (TRL's DFT too): TOFUSFTTrainer refuses them (it trained smoothed cross-entropy), and a
    patched model warns on a training forward without labels (plain Trainer)."""
    trl, model, tokenizer, kwargs = sft_setup(device, tmp_path, max_steps=1)
    from tofu_kernels.hf import TOFUSFTTrainer

    apply_tofu_kernel(model, impl="torch")
    if option == "no_labels_warning":
        ids = torch.randint(3, 20, (2, 6), device=device)
        with pytest.warns(UserWarning, match="label_smoothing_factor"):
            model.train()(input_ids=ids)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            model(input_ids=ids)  # not a training forward: no warning
        return
    if option == "compute_loss_func":
        kwargs["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: 0
    else:
        setattr(kwargs["args"], option, 0.1 if option == "label_smoothing_factor" else "dft")
    with pytest.raises(ValueError, match=option):
        TOFUSFTTrainer(model=model, processing_class=tokenizer, **kwargs)


def test_plain_sft_trainer_never_trains_cross_entropy(device, tmp_path):
    """Recent TRL computes its own loss around the model's forward: that must fail loudly."""
    trl, model, tokenizer, kwargs = sft_setup(device, tmp_path, max_steps=1)
    apply_tofu_kernel(model, impl="torch")
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, **kwargs)
    bypasses = getattr(trl.trainer.utils, "add_fused_lm_head", None) is not None
    if bypasses:
        with pytest.raises(RuntimeError, match="TOFUSFTTrainer"):
            trainer.train()
    else:  # TRL versions that take the model's own loss train TOFU with the plain trainer
        trainer.train()
        assert get_tofu_stats(model) is not None


@pytest.mark.parametrize("accumulation, coef", [(2, None), (1, 0.1)])
def test_sft_trainer_moe_aux_loss_as_trl(device, tmp_path, accumulation, coef):
    """A MoE model's router loss under TOFUSFTTrainer is TRL's: SFTConfig's router_aux_loss_coef
    (it used the model's own), divided by the accumulation steps with num_items_in_batch (it
    counted once per micro-batch), and logged as aux_loss. gamma=0, beta=1 is cross-entropy."""
    trl, _, tokenizer, kwargs = sft_setup(
        device,
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        router_aux_loss_coef=coef,
        learning_rate=1.0,
        max_grad_norm=0.0,
        weight_decay=0.0,
        bf16=False,  # SFTConfig's default: bf16 autocast, on CPU too
    )
    from tofu_kernels.hf import TOFUSFTTrainer

    config = transformers.MixtralConfig(
        **{**TINY_LLAMA, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
    )
    torch.manual_seed(0)
    proto = transformers.MixtralForCausalLM(config).to(device)
    kwargs["train_dataset"] = kwargs["train_dataset"].select(range(8))
    runs = []
    for patched in (False, True):
        model = copy.deepcopy(proto)
        if patched:
            apply_tofu_kernel(model, gamma=0.0, beta=1.0, impl="torch")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        cls = TOFUSFTTrainer if patched else trl.SFTTrainer
        trainer = cls(model=model, processing_class=tokenizer, optimizers=(opt, None), **kwargs)
        trainer.train()
        log = next(h for h in trainer.state.log_history if "loss" in h)
        update = {n: before[n] - p.detach() for n, p in model.named_parameters()}
        runs.append((log, update))
    (trl_log, trl_update), (log, update) = runs
    assert math.isclose(log["loss"], trl_log["loss"], rel_tol=1e-4)
    assert math.isclose(log["aux_loss"], trl_log["aux_loss"], rel_tol=1e-4)
    for key in ("entropy", "mean_token_accuracy"):  # from the kernel's stats, TRL's from logits
        assert math.isclose(log[key], trl_log[key], rel_tol=1e-4), (key, log[key], trl_log[key])
    for name, expected in trl_update.items():  # SGD at lr 1: the gradients
        scale = expected.abs().max().item()
        torch.testing.assert_close(update[name], expected, rtol=0, atol=1e-4 * scale)
