"""The training loop both `lmforge pretrain` and `lmforge sft` run, written out in one function:

    resume? -> for each step: lr -> micro-batches -> train_step -> log -> eval/early stop -> checkpoint
    -> final (and best) model folders

Data come from `next_micro(step, i)` (the recipe's loader + objective), so the loop does not know
what it trains on. The loss is the LM loss unless `loss_fn` (micro-batch -> (loss, figures)) says
otherwise: DPO, PPO/GRPO, distillation, CLIP, the VLM and Medusa heads run through this same loop,
so each gets resume, DDP/FSDP, clipping, metrics.jsonl and checkpoints. Whatever an algorithm
must do before a gradient step (PPO's rollouts, GRPO's sampling) happens in its `next_micro`;
whatever it must carry across a resume (an adaptive KL coefficient, a NumPy generator) lives in
the `loader` object's state_dict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lmforge.checkpoint import save_model
from lmforge.common import DistInfo, LmforgeError, get_logger

from .distributed import barrier
from .loop import EarlyStopping, LossFn, SpikeGuard, StepHooks, TrainConfig, evaluate, train_step
from .optim import OptimConfig, lr_at, set_lr
from .state import clean_stale, latest_good, load_checkpoint, model_to_save, save_checkpoint, verify

log = get_logger("lmforge.train")


@dataclass
class RunContext:
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    info: DistInfo
    metrics: object  # anything with write(dict)
    tokenizer: object = None
    aux_coef: float = 0.0


def resume_from(ckpt_root: Path, resume: str | None) -> Path | None:
    if resume in (None, "", "no"):
        return None
    clean_stale(ckpt_root)
    if resume in ("latest", "auto"):
        path = latest_good(ckpt_root)
        if path is None:
            log.warning("--resume: no usable checkpoint in %s; starting from scratch", ckpt_root)
        return path
    path = Path(resume)
    if not path.is_dir():
        raise LmforgeError(f"--resume {resume}: no such checkpoint folder")
    problem = verify(path)  # the same integrity check as the default resume
    if problem is not None:
        raise LmforgeError(f"--resume {resume}: unusable checkpoint: {problem}")
    return path


def _trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop the old records of those (and the
    old summary). A line that is not JSON (cut by a crash mid-write) is dropped with a warning.
    Rewritten in place: the run's MetricsWriter already holds the file open for appending."""
    if not path.is_file():
        return
    kept = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            log.warning("%s:%d: dropping a torn (half-written) line", path, n)
            continue
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line)
    path.write_text("".join(l + "\n" for l in kept), encoding="utf-8")


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_micro: Callable[[int, int], dict],
    loader,
    val_batches: Callable[[], Iterable[dict]] | None,
    cfg: TrainConfig,
    optim_cfg: OptimConfig,
    ctx: RunContext,
    resume: str | None = None,
    hooks: StepHooks | None = None,
    *,
    loss_fn: LossFn | None = None,
    save_final: bool = True,
) -> dict:
    """Train for `cfg.steps` optimizer steps (see the module docstring). `loader`: anything with
    state_dict()/load_state_dict() (saved in each checkpoint), or None. `save_final=False`: the
    caller writes the trained model itself (a CLIP or VLM folder, Medusa heads, a reward head)."""
    ckpt_root = ctx.run_dir / "checkpoints"
    guard, stopper = SpikeGuard(cfg.spike_factor, cfg.spike_window), EarlyStopping(cfg.patience)
    start, skipped = 0, {"nonfinite": 0, "spike": 0}
    path = resume_from(ckpt_root, resume)
    if path is not None:
        state = load_checkpoint(path, model, optimizer)
        start, skipped = state["step"], state["skipped"]
        if loader is not None:
            loader.load_state_dict(state["loader"])
        guard.history.extend(state["spike_history"])
        stopper.best, stopper.bad_evals = state["best_val"], state["bad_evals"]
        log.info("resumed from %s at step %d", path, start)
        if ctx.info.is_main:
            _trim_metrics(ctx.run_dir / "metrics.jsonl", start)
    if start == 0 and val_batches is not None and cfg.eval_every > 0:
        # The starting point: a fine-tune's curve then shows what training changed, and "best" is the
        # starting model itself if no step improves on it.
        ev = evaluate(model, val_batches(), ctx.device, ctx.dtype)
        stopper.update(ev["val_loss"])
        ctx.metrics.write({"step": 0, **ev, "best_val_loss": stopper.best})
        log.info("step 0: val loss %.4f ppl %.2f", ev["val_loss"], ev["val_ppl"])
        _save_final(model, ctx, "best", 0)
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, disable=not ctx.info.is_main, desc="train", dynamic_ncols=True)
    last, t_run, tokens_run = None, time.perf_counter(), 0
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg.steps, optim_cfg)
        set_lr(optimizer, lr, optim_cfg.lr)
        t0 = time.perf_counter()
        micro = [next_micro(step, i) for i in range(cfg.grad_accum)]
        res = train_step(
            model,
            optimizer,
            micro,
            device=ctx.device,
            dtype=ctx.dtype,
            clip_grad=cfg.clip_grad,
            world_size=ctx.info.world_size,
            guard=guard,
            aux_coef=ctx.aux_coef,
            hooks=hooks,
            step=step,
            loss_fn=loss_fn,
        )
        dt = time.perf_counter() - t0
        tokens_run += res.tokens
        if res.skipped:
            skipped[res.skipped] += 1
            log.warning(
                "step %d: %s loss %.4g (grad norm %.3g): update skipped", step + 1, res.skipped, res.loss, res.grad_norm
            )
        last = {
            "step": step + 1,
            "loss": res.loss,
            "lr": lr,
            "grad_norm": res.grad_norm,
            "tokens_per_s": res.tokens / dt,
            "skipped": sum(skipped.values()),
            "skip_reason": res.skipped,
            **res.metrics,
        }
        if (step + 1) % cfg.log_every == 0 or res.skipped:
            ctx.metrics.write(last)
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{res.tokens / dt:,.0f}", refresh=False)
        done = step + 1 == cfg.steps
        if val_batches is not None and cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or done):
            ev = evaluate(model, val_batches(), ctx.device, ctx.dtype)
            if stopper.update(ev["val_loss"]):
                _save_final(model, ctx, "best", step + 1)
            ctx.metrics.write({"step": step + 1, **ev, "best_val_loss": stopper.best})
            log.info("step %d: val loss %.4f ppl %.2f", step + 1, ev["val_loss"], ev["val_ppl"])
            if stopper.should_stop:
                log.info("early stopping: %d evaluations without improvement", stopper.bad_evals)
                done = True
        if cfg.save_every > 0 and ((step + 1) % cfg.save_every == 0 or done):
            state = {
                "skipped": skipped,
                "loader": loader.state_dict() if loader is not None else {},
                "spike_history": list(guard.history),
                "best_val": stopper.best,
                "bad_evals": stopper.bad_evals,
                "train_config": asdict(cfg),
            }
            save_checkpoint(
                ckpt_root, step + 1, model, optimizer, state, ctx.tokenizer, cfg.keep_last, ctx.info.is_main
            )
        if done:
            break
    bar.close()
    if save_final:
        _save_final(model, ctx, "final", last["step"] if last else start)
    elapsed = time.perf_counter() - t_run
    summary = {
        "steps": last["step"] if last else start,
        "final_loss": last["loss"] if last else None,
        "skipped": skipped,
        "best_val_loss": stopper.best if stopper.best < float("inf") else None,
        "tokens_per_s": tokens_run / elapsed if elapsed > 0 else 0.0,
        "run_dir": str(ctx.run_dir),
    }
    ctx.metrics.write({"summary": summary})
    return summary


def summary_line(summary: dict) -> str:
    def num(x):
        return "n/a" if x is None else f"{x:.4f}"

    return (
        f"done: {summary['steps']} steps, final loss {num(summary['final_loss'])}, best val loss "
        f"{num(summary['best_val_loss'])}, {summary['tokens_per_s']:,.0f} tokens/s -> {summary['run_dir']}/final"
    )


def _save_final(model: nn.Module, ctx: RunContext, name: str, step: int) -> None:
    plain = model_to_save(model)  # collective under FSDP: every rank gathers
    if ctx.info.is_main:
        save_model(plain, ctx.run_dir / name, tokenizer=ctx.tokenizer, extra={"step": step})
    barrier()
