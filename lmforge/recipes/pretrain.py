"""Pretrain a language model from a YAML recipe: causal LM (default), masked LM or T5-style span
corruption, on prepared shards (`lmforge data prepare`) or the built-in stdlib corpus.

    lmforge pretrain                                    # tiny model, built-in corpus, ~1-2 min on CPU
    lmforge pretrain --set train.steps=500 --objective mlm --runs-dir runs
    lmforge pretrain --resume                           # continue the run from its newest good checkpoint
    torchrun --nproc_per_node 2 -m lmforge pretrain --strategy fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from lmforge.common import LmforgeError, checked, dist_info, get_logger
from lmforge.data.shards import data_tokenizer
from lmforge.model import ModelConfig, Transformer
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
    ObjectiveTokens,
    OptimConfig,
    RunContext,
    TrainConfig,
    autocast_dtype,
    batch_generator,
    fit,
    prepare_model,
    setup_runtime,
    shutdown,
    summary_line,
)

log = get_logger("lmforge.pretrain")

FLAGS = {
    "--steps": "train.steps",
    "--objective": "train.objective",
    "--strategy": "train.strategy",
    "--tp": "train.tp",
    "--pp": "train.pp",
    "--data": "data.path",
    "--preset": "model.preset",
    "--runs-dir": "run.dir",
    "--name": "run.name",
    "--seq-len": "train.seq_len",
    "--batch-size": "train.micro_batch_size",
    "--grad-accum": "train.grad_accum",
    "--lr": "optim.lr",
    "--device": "run.device",
    "--dtype": "train.dtype",
    "--teacher": "distill.teacher",
}


@dataclasses.dataclass
class DataConfig:
    path: str | None = None  # shard folder from `lmforge data prepare`; None: the built-in corpus
    max_bytes: int = checked(2_000_000, ge=1)  # built-in corpus: bytes of the stdlib to use
    vocab_size: int = checked(512, ge=1)  # built-in corpus: tokenizer size
    val_fraction: float = checked(0.05, ge=0, lt=1)
    cache_dir: str = "runs/.cache"


@dataclasses.dataclass
class DistillConfig:
    teacher: str | None = None  # a model folder: train to match its next-token distributions (e.g. a draft)
    alpha: float = checked(1.0, ge=0, le=1)  # loss = (1 - alpha) * cross-entropy + alpha * KL(teacher || student)
    temperature: float = checked(1.0, gt=0)
    # start the student from the teacher's weights where the shapes match (embeddings, head, final norm,
    # and teacher layers spread evenly over the student's, as DistilBERT): a shallower copy learns faster
    init_from_teacher: bool = False
    # sequence-level distillation (Kim & Rush 2016; DistillSpec, Zhou et al. 2024): this fraction of each
    # batch's rows are the teacher's own greedy continuations of a short prefix of a training window, so
    # the student learns the states the teacher reaches when it generates (what a speculative draft is
    # asked about), not only those of human text. Drawn from a pool generated once, before training.
    continuation_fraction: float = checked(0.0, ge=0, le=1)
    continuation_pool: int = checked(1024, ge=1)  # sequences in that pool (batched generation, ~10 s per 1k)
    continuation_prefix: int = checked(16, ge=1)  # the longest prefix kept from the window (1..this, drawn)


@dataclasses.dataclass
class PretrainRecipe:
    """configs/pretrain-tiny.yaml, one dataclass per section; `model:` is free-form (a preset and
    ModelConfig fields, checked when the model config is built)."""

    model: dict = dataclasses.field(default_factory=dict)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "pretrain-tiny", FLAGS)
    add_train_arguments(parser)
    add_deprecated_alias(parser, "--model", "--preset")  # --model is a model folder in every other command
    add_deprecated_alias(parser, "--out", "--runs-dir")  # --out is the output itself elsewhere


def data_folder(data: DataConfig, seed: int) -> Path:
    """The shard folder: data.path, or the built-in corpus (built once by rank 0, cached)."""
    from lmforge.data.shards import read_index
    from lmforge.train.distributed import barrier
    from lmforge.train.stdlib_data import builtin_pretrain_data

    if data.path:
        folder = Path(data.path)
        if not (folder / "index.json").is_file():
            raise LmforgeError(f"data.path {folder}: no index.json (make one with `lmforge data prepare`)")
        read_index(folder)  # fail early, before building a model, on a bad data folder
        return folder
    if dist_info().is_main:
        builtin_pretrain_data(data.cache_dir, data.max_bytes, data.vocab_size, data.val_fraction, seed)
    barrier()  # the other ranks wait for rank 0 to build the cache
    return builtin_pretrain_data(data.cache_dir, data.max_bytes, data.vocab_size, data.val_fraction, seed)


def loaders(folder: Path, cfg: TrainConfig, info):
    """-> (train loader, validation loader factory or None). Windows are seq_len + 1 tokens."""
    from lmforge.data.loader import ShardLoader
    from lmforge.data.shards import read_index

    loader = ShardLoader(folder, cfg.seq_len, cfg.micro_batch_size, "train", cfg.seed, info.rank, info.world_size)

    def val_loader():
        return ShardLoader(
            folder, cfg.seq_len, cfg.micro_batch_size, "val", 1234, info.rank, info.world_size, prefetch=0
        )

    val_tokens = read_index(folder)[0]["splits"].get("val", {}).get("tokens", 0)
    if val_tokens < info.world_size * cfg.micro_batch_size * (cfg.seq_len + 1) * 2:
        log.warning("%s: validation split too small (%d tokens) for one batch; no evaluation", folder, val_tokens)
        return loader, None
    return loader, val_loader


def model_config(cfg: dict, vocab_size: int, objective: str) -> ModelConfig:
    fields = dict(cfg.get("model") or {})
    preset = fields.pop("preset", None)
    fields.setdefault("vocab_size", vocab_size)
    if objective != "clm":
        fields["causal"] = False if objective == "mlm" else fields.get("causal", True)
    config = ModelConfig.preset(preset, **fields) if preset else ModelConfig.from_dict(fields)
    if config.vocab_size < vocab_size:  # compared once checked: the raw value may be any YAML
        raise LmforgeError(
            f"model.vocab_size {config.vocab_size} is smaller than the data's {vocab_size} "
            f"(tokenizer + {objective} special ids)"
        )
    return config


def load_teacher(distill: DistillConfig, vocab_size: int, objective: str, device) -> torch.nn.Module | None:
    """The frozen teacher of a distillation run (same tokenizer as the data), or None."""
    if not distill.teacher:
        return None
    from lmforge.checkpoint import load_model

    if objective != "clm":
        raise LmforgeError(f"distill.teacher: distillation needs train.objective clm, not {objective}")
    if not 0.0 <= distill.alpha <= 1.0 or distill.temperature <= 0:
        raise LmforgeError(
            f"distill: alpha must be in [0, 1] and temperature > 0 (got {distill.alpha}, {distill.temperature})"
        )
    teacher = load_model(distill.teacher).to(device).eval().requires_grad_(False)
    if teacher.config.vocab_size != vocab_size:
        raise LmforgeError(
            f"distill.teacher {distill.teacher}: vocabulary {teacher.config.vocab_size} != the data "
            f"tokenizer's {vocab_size} (the teacher must share the student's tokenizer)"
        )
    log.info("distilling from %s (alpha %.2f, temperature %.2f)", distill.teacher, distill.alpha, distill.temperature)
    return teacher


def init_from(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Copy the teacher's tensors into the student where names and shapes match; student layer i
    takes teacher layer round(i * L_teacher / L_student). Returns the number of tensors copied."""
    ls, lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    source = {f"model.layers.{i}.": f"model.layers.{round(i * lt / ls)}." for i in range(ls)}
    theirs, copied = teacher.state_dict(), 0
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            prefix = next((p for p in source if name.startswith(p)), None)
            key = source[prefix] + name[len(prefix) :] if prefix else name
            if key in theirs and theirs[key].shape == tensor.shape:
                tensor.copy_(theirs[key])
                copied += 1
    return copied


def continuation_pool(
    teacher, loader, distill: DistillConfig, seq_len: int, seed: int, device, generate_batch: int = 128
) -> torch.Tensor:
    """[pool, seq_len + 1] windows: a training window's first 1..continuation_prefix tokens, then the
    teacher's greedy continuation. Generated `generate_batch` rows at a time (left-padded prompts):
    batched decoding is ~10x the tokens/s of the loader's micro-batches."""
    from tqdm import tqdm

    from lmforge.infer.generate import generate

    g = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []
    max_prefix = min(distill.continuation_prefix, seq_len)
    bar = tqdm(total=distill.continuation_pool, desc="teacher continuations", unit="seq", leave=False)
    while len(rows) < distill.continuation_pool:
        prompts: list[list[int]] = []
        while len(prompts) < min(generate_batch, distill.continuation_pool - len(rows)):
            batch = windows(next(loader))
            lengths = torch.randint(1, max_prefix + 1, (batch.shape[0],), generator=g).tolist()
            prompts += [batch[i, :n].tolist() for i, n in enumerate(lengths)]
        new = generate(teacher, prompts, max_new_tokens=seq_len + 1 - min(map(len, prompts)))
        for prompt, cont in zip(prompts, new):
            rows.append(torch.cat([torch.tensor(prompt), cont])[: seq_len + 1])
        bar.update(len(prompts))
    bar.close()
    return torch.stack(rows[: distill.continuation_pool]).to(device)


def with_continuations(batch: torch.Tensor, pool: torch.Tensor, fraction: float, generator) -> torch.Tensor:
    """The batch with its first round(fraction * rows) rows replaced by pool rows drawn at random."""
    n = round(fraction * batch.shape[0])
    if n == 0:
        return batch
    picks = torch.randint(0, pool.shape[0], (n,), generator=generator)
    return torch.cat([pool[picks].to(batch.device, batch.dtype), batch[n:]])


def windows(batch) -> torch.Tensor:
    x, y = batch
    return torch.cat([x, y[:, -1:]], dim=1)


def main(args: argparse.Namespace) -> dict:
    cfg = load_config(PretrainRecipe, args.config, overrides_from_args(args, FLAGS) + switch_overrides(args))
    train_cfg, optim_cfg, data_cfg, run_cfg, distill = cfg.train, cfg.optim, cfg.data, cfg.run, cfg.distill
    device, info = setup_runtime(run_cfg.device, train_cfg.seed)
    # The ranks of a tensor-parallel group or of a pipeline read the same data.
    data_info = data_parallel_info(info, train_cfg.tp * train_cfg.pp)
    run_dir = make_run_dir(run_cfg.dir, run_cfg.name, cfg if info.is_main else None, resume=bool(args.resume))
    folder = data_folder(data_cfg, train_cfg.seed)  # the data's tokenizer decides the vocabulary
    tokenizer = data_tokenizer(folder)
    objective = ObjectiveTokens(train_cfg.objective, tokenizer.vocab_size, tokenizer.eos_id)
    mconfig = model_config({"model": cfg.model}, objective.model_vocab, train_cfg.objective)
    if train_cfg.auto_fit:
        from lmforge.train.memory import auto_fit

        train_cfg = auto_fit(mconfig, train_cfg, device, info.world_size)
    loader, val_loader = loaders(folder, train_cfg, data_info)
    if mconfig.max_position_embeddings < train_cfg.seq_len + 2 * len(objective.sentinels):
        raise LmforgeError(
            f"train.seq_len {train_cfg.seq_len} exceeds model.max_position_embeddings {mconfig.max_position_embeddings}"
        )
    model = Transformer(mconfig)
    log.info(
        "model: %.2fM parameters, objective %s, data %s",
        sum(p.numel() for p in model.parameters()) / 1e6,
        train_cfg.objective,
        folder,
    )
    teacher = load_teacher(distill, tokenizer.vocab_size, train_cfg.objective, device)
    if teacher is not None and distill.init_from_teacher:  # a resumed run then loads its checkpoint over it
        copied = init_from(model, teacher)
        log.info("student initialised from the teacher: %d of %d tensors copied", copied, len(model.state_dict()))
    pool = None
    if teacher is not None and distill.continuation_fraction > 0:
        pool = continuation_pool(teacher, loader, distill, train_cfg.seq_len, train_cfg.seed + data_info.rank, device)
        log.info("%d teacher continuations for %.0f%% of each batch", len(pool), 100 * distill.continuation_fraction)
    elif distill.continuation_fraction > 0:
        raise LmforgeError("distill.continuation_fraction needs distill.teacher (whose continuations?)")
    wrapped, optimizer = prepare_model(model, train_cfg, optim_cfg, device)

    def next_micro(step: int, i: int) -> dict:
        rows = windows(next(loader))
        if pool is not None:
            rows = with_continuations(
                rows, pool, distill.continuation_fraction, batch_generator(train_cfg.seed + 1, step, i, data_info.rank)
            )
        batch = objective.batch(rows, batch_generator(train_cfg.seed, step, i, data_info.rank))
        if teacher is not None:
            with torch.no_grad():
                batch["teacher_logits"] = teacher(batch["input_ids"].to(device))
            batch["distill"] = (distill.alpha, distill.temperature)
        return batch

    def val_batches():
        vl = val_loader()
        return [
            objective.batch(windows(next(vl)), batch_generator(99, 0, i, data_info.rank))
            for i in range(train_cfg.eval_batches)
        ]

    if val_loader is None:
        val_batches = None
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
        aux_coef=mconfig.router_aux_loss_coef if mconfig.num_experts else 0.0,
    )
    try:
        summary = fit(wrapped, optimizer, next_micro, loader, val_batches, train_cfg, optim_cfg, ctx, args.resume)
    finally:
        metrics.close()
        loader.close()
        shutdown()
    if info.is_main:
        print(summary_line(summary))
    return 0
