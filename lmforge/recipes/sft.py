"""Supervised fine-tuning: chat `messages` (or prompt/response) JSONL rendered with the model's chat
template, loss only on assistant tokens, short examples packed with document-aware attention.
Full fine-tuning by default; `--method` plugs in PEFT (lora, dora, qlora, adalora, ia3, adapter,
prompt, p_tuning, prefix) and `--qat SCHEME` trains through fake quantization.

    lmforge sft --model runs/pretrain-tiny/final                 # built-in set: signature -> docstring
    lmforge sft --model MODEL --data train.jsonl --val-data val.jsonl --method lora --set peft.options.r=16
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from lmforge.common import LmforgeError, atomic_write_text, checked, get_logger
from lmforge.model.config import PRESETS
from lmforge.parallel import data_parallel_info
from lmforge.recipes._common import (
    MetricsWriter,
    RunConfig,
    add_config_arguments,
    add_deprecated_alias,
    add_train_arguments,
    load_config,
    make_run_dir,
    overrides_from_args,
    switch_overrides,
)
from lmforge.train import (
    OptimConfig,
    RunContext,
    TrainConfig,
    autocast_dtype,
    fit,
    prepare_model,
    setup_runtime,
    shutdown,
    summary_line,
)

log = get_logger("lmforge.sft")

FLAGS = {
    "--model": "model.path",
    "--preset": "model.preset",
    "--data": "data.train",
    "--val-data": "data.val",
    "--method": "peft.method",
    "--qat": "peft.qat",
    "--steps": "train.steps",
    "--runs-dir": "run.dir",
    "--name": "run.name",
    "--seq-len": "train.seq_len",
    "--batch-size": "train.micro_batch_size",
    "--grad-accum": "train.grad_accum",
    "--lr": "optim.lr",
    "--device": "run.device",
    "--strategy": "train.strategy",
    "--tp": "train.tp",
    "--pp": "train.pp",
    "--dtype": "train.dtype",
}

# --method name -> (PEFT config method, fixed options)
METHODS = {
    "lora": ("lora", {}),
    "dora": ("lora", {"use_dora": True}),
    "qlora": ("lora", {}),
    "adalora": ("adalora", {}),
    "ia3": ("ia3", {}),
    "adapter": ("adapter", {}),
    "prompt": ("prompt_tuning", {}),
    "p_tuning": ("p_tuning", {}),
    "prefix": ("prefix", {}),
}


@dataclasses.dataclass
class ModelSource:
    path: str | None = None  # checkpoint or HF folder (with a tokenizer); None: fresh model (demo/tests)
    preset: str = checked("tiny", choices=PRESETS)
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields for a fresh model


@dataclasses.dataclass
class SFTData:
    train: str = "builtin"  # JSONL file, or "builtin": stdlib signature -> first docstring sentence
    val: str | None = None  # JSONL file; the built-in set brings its own (split by module)
    max_bytes: int | None = checked(1_500_000, ge=1)  # built-in set: bytes of the stdlib scanned (null: all of it)
    # built-in set: modules the data split holds out for evaluation give no example (the pipeline
    # passes its data's pack.val_fraction and pack.seed)
    heldout_fraction: float = checked(0.0, ge=0, lt=1)
    split_seed: int = checked(0, ge=0)
    pack: bool = True
    cache_dir: str = "runs/.cache"  # built-in tokenizer for a fresh model
    # rehearsal: a packed data folder (`lmforge data prepare`, same tokenizer) whose windows make up this
    # fraction of the training rows, so fine-tuning keeps what pretraining taught (null: none)
    replay: str | None = None
    replay_fraction: float = checked(0.0, ge=0, lt=1)


@dataclasses.dataclass
class PeftSection:
    method: str = checked("full", choices=("full", *METHODS))  # full fine-tuning or a PEFT method
    options: dict = dataclasses.field(default_factory=dict)  # fields of the PEFT config (r, alpha, target_modules...)
    qat: str | None = None  # e.g. int4-g128: quantization-aware training with fake-quant linears


@dataclasses.dataclass
class SFTRecipe:
    """configs/sft-tiny.yaml, one dataclass per section."""

    model: ModelSource = dataclasses.field(default_factory=ModelSource)
    data: SFTData = dataclasses.field(default_factory=SFTData)
    peft: PeftSection = dataclasses.field(default_factory=PeftSection)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "sft-tiny", FLAGS)
    add_train_arguments(parser)
    add_deprecated_alias(parser, "--out", "--runs-dir")  # --out is the output itself elsewhere


def load_base(src: ModelSource, data: SFTData):
    """-> (model, tokenizer): a saved model with its tokenizer, or a fresh one on the built-in tokenizer."""
    from lmforge.checkpoint import load_model, load_tokenizer_if_any

    if src.path:
        model, tokenizer = load_model(src.path), load_tokenizer_if_any(src.path)
        if tokenizer is None:
            raise LmforgeError(
                f"model.path {src.path}: no tokenizer.json next to the weights (SFT needs the "
                "tokenizer and its chat template)"
            )
        return model.float(), tokenizer
    from lmforge.data.shards import data_tokenizer
    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.stdlib_data import builtin_pretrain_data

    tokenizer = data_tokenizer(builtin_pretrain_data(data.cache_dir))
    config = ModelConfig.preset(src.preset, **{"vocab_size": tokenizer.vocab_size, **src.overrides})
    return Transformer(config), tokenizer


def apply_method(model, peft_cfg: PeftSection):
    """Quantization and adapter swaps on the base model, in the checkpoint's replay order."""
    if peft_cfg.qat:
        from lmforge.quant import prepare_qat

        prepare_qat(model, peft_cfg.qat)  # fake-quant forward; convert with `lmforge quantize` afterwards
    if peft_cfg.method == "full":
        return model
    if peft_cfg.method not in METHODS:
        raise LmforgeError(f"peft.method {peft_cfg.method!r}: choose from full, {', '.join(METHODS)}")
    try:
        from lmforge import peft
    except ImportError as e:
        raise LmforgeError(f"--method {peft_cfg.method} needs lmforge.peft, which is not available ({e})") from None
    if peft_cfg.method == "qlora":
        from lmforge import quant

        quant.swap(model, "nf4")  # frozen 4-bit base, LoRA on top
        quant.record(model, quant.quant_config(model, "rtn"))
    name, fixed = METHODS[peft_cfg.method]
    peft.apply(model, peft.config_from_dict({"method": name, **peft_cfg.options, **fixed}, "peft.options"))
    trainable, total = peft.count_parameters(model)
    log.info("%s: %d of %d parameters trainable (%.2f%%)", peft_cfg.method, trainable, total, 100 * trainable / total)
    return model


def adalora_hooks(model):
    """AdaLoRA's two additions to the step: the orthogonality regulariser on P and Q, and importance-
    based rank re-allocation after each update -> (StepHooks, RankAllocator)."""
    from lmforge import peft
    from lmforge.train.loop import StepHooks

    config = next(c for c in peft.peft_configs(model) if c.method == "adalora")
    allocator = peft.RankAllocator(model, config)
    hooks = StepHooks(
        extra_loss=lambda m: config.orth_reg_weight * peft.orthogonal_regularization(m), after_update=allocator.step
    )
    return hooks, allocator


def build_rows(data: SFTData, tokenizer, seq_len: int, seed: int):
    """-> (training conversations, train rows, val rows or None)."""
    from lmforge.train.sft_data import encode_example, pack, read_jsonl, record_to_messages
    from lmforge.train.stdlib_data import builtin_sft_examples

    if data.train == "builtin":
        splits = builtin_sft_examples(
            data.max_bytes, seed=seed, heldout_fraction=data.heldout_fraction, split_seed=data.split_seed
        )
        train = [record_to_messages(r, "built-in") for r in splits["train"]]
        val = [record_to_messages(r, "built-in") for r in splits["val"]]
    else:
        train, val = read_jsonl(data.train), None
    if data.val:
        val = read_jsonl(data.val)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)

    def rows(convs, name):
        examples = [encode_example(tokenizer, m, seq_len, f"{name} example {i}") for i, m in enumerate(convs)]
        return pack(examples, seq_len, pad) if data.pack else [r for e in examples for r in pack([e], seq_len, pad)]

    train_rows = rows(train, data.train)
    if data.replay and data.replay_fraction > 0:
        from lmforge.train.sft_data import replay_rows

        n = round(len(train_rows) * data.replay_fraction / (1 - data.replay_fraction))
        train_rows += replay_rows(data.replay, n, seq_len, tokenizer.vocab_size, seed)
        log.info("replay: %d pretraining windows from %s among the training rows", n, data.replay)
    return train, train_rows, (rows(val, data.val or "validation") if val else None)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(SFTRecipe, args.config, overrides_from_args(args, FLAGS) + switch_overrides(args))
    train_cfg, optim_cfg, src, data, peft_cfg, run_cfg = cfg.train, cfg.optim, cfg.model, cfg.data, cfg.peft, cfg.run
    device, info = setup_runtime(run_cfg.device, train_cfg.seed)
    # The ranks of a tensor-parallel group or of a pipeline read the same data.
    data_info = data_parallel_info(info, train_cfg.tp * train_cfg.pp)
    run_dir = make_run_dir(run_cfg.dir, run_cfg.name, cfg if info.is_main else None, resume=bool(args.resume))
    model, tokenizer = load_base(src, data)
    if peft_cfg.method in ("prompt", "p_tuning") and data.pack:
        log.info("%s: virtual input tokens cannot be shared by packed examples; one example per row", peft_cfg.method)
        data.pack = False
    conversations, train_rows, val_rows = build_rows(data, tokenizer, train_cfg.seq_len, train_cfg.seed)
    if info.is_main:  # what the model is trained on, for contamination checks of any later evaluation
        atomic_write_text(
            run_dir / "train_data.jsonl",
            "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations),
        )
    log.info(
        "SFT: %d packed training rows of %d tokens, %s validation rows",
        len(train_rows),
        train_cfg.seq_len,
        len(val_rows) if val_rows else "no",
    )
    if train_cfg.auto_fit:
        from lmforge.train.memory import auto_fit

        mode = "full" if peft_cfg.method == "full" else "qlora" if peft_cfg.method == "qlora" else "lora"
        train_cfg = auto_fit(model.config, train_cfg, device, info.world_size, mode=mode)
    if peft_cfg.method == "adalora":  # the rank schedule spans the run unless configured
        peft_cfg.options.setdefault("total_step", train_cfg.steps)
    model = apply_method(model, peft_cfg)
    hooks, allocator = adalora_hooks(model) if peft_cfg.method == "adalora" else (None, None)
    wrapped, optimizer = prepare_model(model, train_cfg, optim_cfg, device)

    from lmforge.train.sft_data import PackedBatches

    loader = PackedBatches(
        train_rows, train_cfg.micro_batch_size, train_cfg.seed, data_info.rank, data_info.world_size, segments=data.pack
    )
    val_batches = None
    if val_rows and len(val_rows) >= train_cfg.micro_batch_size * data_info.world_size:

        def val_batches():
            vl = PackedBatches(
                val_rows, train_cfg.micro_batch_size, 1234, data_info.rank, data_info.world_size, data.pack
            )
            return [next(vl) for _ in range(min(train_cfg.eval_batches, vl.per_epoch // data_info.world_size))]

    metrics = MetricsWriter(
        run_dir / "metrics.jsonl", enabled=info.is_main, tensorboard_dir=run_dir / "tb" if run_cfg.tensorboard else None
    )
    ctx = RunContext(
        run_dir,
        device,
        autocast_dtype(train_cfg.dtype, device),
        info,
        metrics,
        tokenizer,
        aux_coef=model.config.router_aux_loss_coef if model.config.num_experts else 0.0,
    )
    try:
        summary = fit(
            wrapped,
            optimizer,
            lambda step, i: next(loader),
            loader,
            val_batches,
            train_cfg,
            optim_cfg,
            ctx,
            args.resume,
            hooks=hooks,
        )
        if allocator is not None:
            ranks = allocator.final_ranks()
            metrics.write({"adalora_final_ranks": ranks, "adalora_total_rank": sum(ranks.values())})
            log.info("AdaLoRA final ranks (total %d): %s", sum(ranks.values()), ranks)
        if peft_cfg.method != "full" and info.is_main:
            from lmforge import peft

            peft.save_adapter(model, run_dir / "adapter", base_model_name=src.path or src.preset)
            if METHODS[peft_cfg.method][0] == "lora":  # also PEFT's format: peft.PeftModel.from_pretrained loads it
                try:
                    peft.export_peft(model, run_dir / "adapter-peft", base_model_name=src.path or src.preset)
                except LmforgeError as e:  # an arch whose HF layout renames the adapted linears (GPT-2)
                    log.warning("adapter-peft not written: %s", e)
    finally:
        metrics.close()
        shutdown()
    if info.is_main:
        print(summary_line(summary))
    return 0
