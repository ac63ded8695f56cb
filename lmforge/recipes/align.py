"""Post-training: DPO (IPO, conservative), reward modelling, GRPO, PPO and knowledge distillation,
full or with LoRA, from a YAML recipe. Each method prints and saves its before/after figures.

    lmforge align --method dpo                                   # demo: fresh tiny model, format preferences
    lmforge align --method dpo --model runs/x/final --set task.name=docstring
    lmforge align --method reward --model runs/x/final --runs-dir runs --name rm
    lmforge align --method grpo --set task.name=arithmetic       # verifiable reward
    lmforge align --method ppo --model runs/x/final --set model.reward_model=runs/rm/final
    lmforge align --method distill --model runs/draft/final --set model.teacher=runs/base/final
    lmforge align --method rlaif --model runs/x/final --set rlaif.judge=http://localhost:8000/v1
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import lmforge.recipes._align_rollout as R
from lmforge.common import LmforgeError, atomic_write_json, get_device, get_logger, seed_everything
from lmforge.recipes._common import (
    add_config_arguments,
    add_deprecated_alias,
    load_config,
    make_run_dir,
    overrides_from_args,
)
from lmforge.recipes._fit import FitOptions, LoopState, add_resume_argument, constant_lr, run_fit
from lmforge.train import align as A
from lmforge.train import align_data as D
from lmforge.train.align_config import AlignConfig

log = get_logger("lmforge.align")
FLAGS = {
    "--method": "method",
    "--model": "model.path",
    "--steps": "train.steps",
    "--runs-dir": "run.dir",
    "--name": "run.name",
    "--task": "task.name",
    "--preset": "model.preset",
    "--lr": "train.lr",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "align-default", FLAGS)
    add_deprecated_alias(p, "--out", "--runs-dir")  # --out is the output itself elsewhere
    add_resume_argument(p)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(AlignConfig, args.config, overrides_from_args(args, FLAGS))
    seed_everything(cfg.train.seed)
    resume = getattr(args, "resume", None)
    run = make_run_dir(cfg.run.dir, cfg.run.name, cfg, resume=bool(resume))
    device = get_device(cfg.train.device)
    results = RUNNERS[cfg.method](cfg, device, run, resume=resume)
    atomic_write_json(run / "results.json", {"method": cfg.method, **results})
    print(json.dumps(results, indent=2))
    return 0


# ----------------------------------------------------------------------------- set-up


def task_records(cfg: AlignConfig) -> tuple[list[dict], list[dict]]:
    t = cfg.task
    n, m, seed = t.train_size, t.eval_size, t.seed
    if t.name == "format":
        return D.format_preference_pairs(n, seed), D.format_preference_pairs(m, seed + 1)
    if t.name == "arithmetic":
        return D.arithmetic_prompts(n, seed), D.arithmetic_prompts(m, seed + 1)
    if t.name == "docstring":
        from lmforge.train.stdlib_data import builtin_sft_examples

        ex = builtin_sft_examples(max_bytes=600_000)
        return (D.docstring_preference_pairs(ex["train"], seed)[:n], D.docstring_preference_pairs(ex["val"], seed)[:m])
    if t.name == "file":
        if not t.path:
            raise LmforgeError("task.name=file needs task.path (a JSONL file)")
        records = D.read_pairs(t.path) if cfg.method in ("dpo", "reward", "rlaif") else D.read_prompts(t.path)
        split = max(1, len(records) // 10)
        return records[split:], records[:split]
    raise LmforgeError(f"task.name {t['name']!r}: choose format, docstring, arithmetic or file")


def load_policy(cfg: AlignConfig, records: list[dict], device):
    """(model, tokenizer): the configured model, or a fresh preset + tokenizer trained on the task."""
    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.model import build_model
    from lmforge.tokenizer import train_tokenizer

    path = cfg.model.path
    if path:
        model, tok = load_model(path), load_tokenizer_if_any(path)
        if tok is None:
            raise LmforgeError(f"{path}: no tokenizer.json next to the model")
    else:
        texts = [" ".join(str(v) for v in r.values()) for r in records] * 4 + [str(i) for i in range(100)]
        tok = train_tokenizer(texts, vocab_size=300)
        model = build_model(cfg.model.preset, vocab_size=tok.vocab_size)
    if cfg.peft.method == "lora":
        from lmforge import peft

        peft.apply(model, peft.LoraConfig(r=cfg.peft.r, alpha=cfg.peft.alpha, target_modules="all-linear"))
    elif cfg.peft.method != "full":
        raise LmforgeError(f"peft.method {cfg.peft.method!r}: align supports full and lora")
    return model.to(device), tok


class Reference:
    """The frozen reference policy: the base with LoRA disabled (no second copy), else a frozen copy."""

    def __init__(self, model):
        from lmforge import peft

        self.model, self.lora = model, bool(peft.peft_configs(model))
        self.copy = None if self.lora else copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, ids, attention_mask=None):
        if self.copy is not None:
            return self.copy(ids, attention_mask=attention_mask)
        from lmforge import peft

        with peft.adapter_rows(self.model, [None] * ids.shape[0]):
            return self.model(ids, attention_mask=attention_mask)


def _optimizer(model, cfg: AlignConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)


def _batches(n: int, size: int, step: int, seed: int) -> list[int]:
    """A seeded random batch of indices for `step` (the same on a re-run)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(n, generator=g)[:size].tolist()


def _fit(
    model,
    opt,
    loss_fn,
    next_batch,
    run: Path,
    steps: int,
    cfg: AlignConfig,
    resume: str | None,
    tok=None,
    clip_grad: float = 0.0,
    state: LoopState | None = None,
    save_every: int = 0,
) -> dict:
    """The method's steps through train.fit (metrics.jsonl and checkpoints, every quarter of the run
    unless `save_every` says otherwise, in the run folder; `resume` continues from one)."""
    opts = FitOptions(
        steps,
        constant_lr(cfg.train.lr),
        clip_grad=clip_grad,
        save_every=save_every or max(1, steps // 4),
        resume=resume,
    )
    return run_fit(model, opt, loss_fn, next_batch, run, opts, state, tok, next(model.parameters()).device)


def _save(model, tok, run: Path, name: str = "final") -> None:
    from lmforge.checkpoint import save_model

    save_model(model, run / name, tokenizer=tok)


# ----------------------------------------------------------------------------- DPO and reward model


def _pair_tensors(tok, records, max_len, device):
    prompts = [r["prompt"] for r in records] * 2
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    return [t.to(device) for t in D.encode_responses(tok, prompts, responses, max_len)]


def _pair_batch(tok, records, max_len, device) -> dict:
    ids, attn, resp = _pair_tensors(tok, records, max_len, device)
    return {"ids": ids, "attention_mask": attn, "response_mask": resp}


def _pair_logps(model, tensors):
    ids, attn, resp = tensors
    logp = A.sequence_logprobs(model, ids, resp, attn)
    return logp.chunk(2)


def run_dpo(cfg: AlignConfig, device, run: Path, resume: str | None = None) -> dict:
    train, held = task_records(cfg)
    model, tok = load_policy(cfg, train, device)
    return train_dpo(cfg, model, tok, train, held, device, run, resume)


def train_dpo(
    cfg: AlignConfig, model, tok, train: list[dict], held: list[dict], device, run: Path, resume: str | None = None
) -> dict:
    ref = Reference(model)
    dc, tc = cfg.dpo, cfg.train

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            t = _pair_tensors(tok, held, tc.max_len, device)
            pc, pr = _pair_logps(model, t)
            rc, rr = _pair_logps(ref, t)
            out = A.dpo_loss(pc, pr, rc, rr, dc.beta, dc.loss_type, dc.label_smoothing)
        model.train()
        # accuracy of the *policy's* own preference (log pi_c > log pi_r), which DPO should raise
        return {
            "margin": out.margin,
            "reward_accuracy": out.accuracy,
            "policy_prefers_chosen": float((pc > pr).float().mean()),
        }

    def next_batch(step: int) -> dict:
        return _pair_batch(
            tok, [train[i] for i in _batches(len(train), tc.batch_size, step, tc.seed)], tc.max_len, device
        )

    def loss_fn(b: dict):
        t = (b["ids"], b["attention_mask"], b["response_mask"])
        with torch.no_grad():
            rc, rr = _pair_logps(ref, t)
        pc, pr = _pair_logps(model, t)
        out = A.dpo_loss(pc, pr, rc, rr, dc.beta, dc.loss_type, dc.label_smoothing)
        return out.loss, {"margin": out.margin, "reward_accuracy": out.accuracy}

    before = evaluate()
    _fit(model, _optimizer(model, cfg), loss_fn, next_batch, run, tc.steps, cfg, resume, tok)
    after = evaluate()
    _save(model, tok, run)
    return {"before": before, "after": after}


def run_reward(cfg: AlignConfig, device, run: Path, resume: str | None = None) -> dict:
    from safetensors.torch import save_file

    train, held = task_records(cfg)
    lm, tok = load_policy(cfg, train, device)
    rm = A.RewardModel(lm).to(device)
    tc = cfg.train

    def rewards(records):
        ids, attn, _ = _pair_tensors(tok, records, tc.max_len, device)
        return rm(ids, attn).chunk(2)

    def accuracy() -> float:
        rm.eval()
        with torch.no_grad():
            c, r = rewards(held)
        rm.train()
        return float(((c > r).float() + 0.5 * (c == r).float()).mean())  # a tie counts half

    def next_batch(step: int) -> dict:
        return _pair_batch(
            tok, [train[i] for i in _batches(len(train), tc.batch_size, step, tc.seed)], tc.max_len, device
        )

    def loss_fn(b: dict):
        c, r = rm(b["ids"], b["attention_mask"]).chunk(2)
        return A.bradley_terry_loss(c, r), {"accuracy": float((c > r).float().mean())}

    before = accuracy()
    _fit(rm, _optimizer(rm, cfg), loss_fn, next_batch, run, tc.steps, cfg, resume)
    after = accuracy()
    _save(lm, tok, run)
    save_file(
        {k: v.contiguous() for k, v in rm.score.state_dict().items()}, str(run / "final" / "reward_head.safetensors")
    )
    return {"before": {"pairwise_accuracy": before}, "after": {"pairwise_accuracy": after}}


def load_reward_model(path: str, device) -> A.RewardModel:
    from safetensors.torch import load_file

    from lmforge.checkpoint import load_model

    head = Path(path) / "reward_head.safetensors"
    if not head.is_file():
        raise LmforgeError(f"{path}: not a reward model (no reward_head.safetensors; train one with --method reward)")
    rm = A.RewardModel(load_model(path))
    rm.score.load_state_dict(load_file(str(head)))
    return rm.to(device).eval()


def run_rlaif(cfg: AlignConfig, device, run: Path, resume: str | None = None) -> dict:
    """AI feedback: the policy samples two answers per prompt, a judge model (a model folder or an
    OpenAI-compatible URL) picks the one that better follows the written principles (both orders,
    so position bias cancels), and the labelled pairs train the policy with DPO."""
    from lmforge.eval.lm import load_lm

    judge_spec = cfg.rlaif.judge
    if not judge_spec:
        raise LmforgeError("rlaif needs rlaif.judge: a judge model folder or an OpenAI-compatible endpoint URL")
    train, held = task_records(cfg)
    model, tok = load_policy(cfg, train, device)
    judge = load_lm(str(judge_spec)) if isinstance(judge_spec, (str, Path)) else judge_spec
    labelled = R.label_pairs_with_judge(
        model, tok, [r["prompt"] for r in train + held], judge, cfg.rlaif.principles, cfg.rl, device
    )
    if len(labelled) < 4:
        raise LmforgeError(f"the judge preferred one answer in only {len(labelled)} pairs: too few to train on")
    split = max(1, len(labelled) // 5)
    results = train_dpo(cfg, model, tok, labelled[split:], labelled[:split], device, run, resume)
    return {"labelled_pairs": len(labelled), **results}


# ----------------------------------------------------------------------------- GRPO and PPO


def run_grpo(cfg: AlignConfig, device, run: Path, resume: str | None = None) -> dict:
    return _run_rl(cfg, device, run, use_value=False, resume=resume)


def run_ppo(cfg: AlignConfig, device, run: Path, resume: str | None = None) -> dict:
    return _run_rl(cfg, device, run, use_value=True, resume=resume)


def _run_rl(cfg: AlignConfig, device, run: Path, use_value: bool, resume: str | None = None) -> dict:
    """Each rollout (sampling, rewards, advantages: the algorithm's work before its gradient steps)
    is followed by `rl.ppo_epochs` optimizer steps on it, so fit's step s uses rollout s // epochs;
    checkpoints fall on rollout boundaries, so a resumed run samples where the interrupted one would."""
    if cfg.task.name in ("format", "docstring") and not cfg.model.reward_model:
        cfg.task.name = "arithmetic"  # a verifiable task when no reward model is given
    train, held = task_records(cfg)
    model, tok = load_policy(cfg, train, device)
    ref = Reference(model)
    rm = load_reward_model(cfg.model.reward_model, device) if cfg.model.reward_model else None
    rc, tc = cfg.rl, cfg.train
    value_head = torch.nn.Linear(model.config.hidden_size, 1).to(device) if use_value else None
    params = [p for p in model.parameters() if p.requires_grad] + (list(value_head.parameters()) if use_value else [])
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
    kl_ctl = A.AdaptiveKLController(rc.kl_coef, rc.kl_target, horizon=max(10, tc.steps))
    before = R._mean_reward(model, tok, held, rc, rm, device)
    state = LoopState(values={"kl_coef": kl_ctl.value, "kls": []})  # restored on resume
    kls = state.values["kls"]
    G = rc.group_size if not use_value else 1
    epochs, current = rc.ppo_epochs, {}

    def make_rollout(step: int) -> dict:
        batch = [train[i] for i in _batches(len(train), rc.prompts_per_step, step, tc.seed)]
        records = [r for r in batch for _ in range(G)]
        texts, ids, attn, resp = R.rollout(model, tok, [r["prompt"] for r in records], rc, step + 1, device)
        rewards = R._score(texts, records, rm, ids, attn, R.shaped_arithmetic_reward)
        mask = resp[:, 1:].float()
        with torch.no_grad():
            ref_logp = A.token_logprobs(ref(ids, attn), ids)
            logits, hidden = model(ids, attention_mask=attn, return_hidden=True)
            old_logp = A.token_logprobs(logits, ids)
        old_values = returns = None
        if use_value:
            with torch.no_grad():
                old_values = value_head(hidden[:, :-1]).squeeze(-1) * mask
            token_rewards = -state.values["kl_coef"] * (old_logp - ref_logp) * mask
            last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
            token_rewards = token_rewards + last.float() * rewards[:, None]
            adv, returns = A.gae(token_rewards, old_values, mask, rc.gamma, rc.lam)
            adv = A.whiten(adv, mask)
        else:
            adv = A.grpo_advantages(rewards, G)[:, None] * mask
        kl = float(((old_logp - ref_logp) * mask).sum() / mask.sum().clamp(min=1))
        kls.append(kl)
        if use_value:  # the next rollout's coefficient (this one's rewards are already shaped)
            kl_ctl.value = state.values["kl_coef"]
            state.values["kl_coef"] = kl_ctl.update(kl, 1)
        return {
            "ids": ids,
            "attention_mask": attn,
            "mask": mask,
            "ref_logp": ref_logp,
            "old_logp": old_logp,
            "adv": adv,
            "old_values": old_values,
            "returns": returns,
            "mean_reward": float(rewards.mean()),
        }

    def next_batch(step: int) -> dict:
        if current.get("rollout") != step // epochs:
            current.update(rollout=step // epochs, batch=make_rollout(step // epochs))
        return current["batch"]

    def loss_fn(b: dict):
        mask, ref_logp = b["mask"], b["ref_logp"]
        logits, hidden = model(b["ids"], attention_mask=b["attention_mask"], return_hidden=True)
        logp = A.token_logprobs(logits, b["ids"])
        loss = A.ppo_policy_loss(logp, b["old_logp"], b["adv"], mask, rc.clip)
        if use_value:
            values = value_head(hidden[:, :-1]).squeeze(-1)
            loss = loss + 0.5 * A.ppo_value_loss(values, b["old_values"], b["returns"], mask, rc.clip)
        else:
            loss = loss + rc.kl_coef * (A.kl_penalty(logp, ref_logp) * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"mean_reward": b["mean_reward"], "kl_to_reference": kls[-1]}

    trained = torch.nn.ModuleDict({"policy": model, "value": value_head}) if use_value else model
    _fit(
        trained,
        opt,
        loss_fn,
        next_batch,
        run,
        tc.steps * epochs,
        cfg,
        resume,
        tok,
        clip_grad=1.0,
        state=state,
        save_every=epochs * max(1, tc.steps // 4),
    )
    after = R._mean_reward(model, tok, held, rc, rm, device)
    _save(model, tok, run)
    return {
        "before": {"mean_reward": before},
        "after": {"mean_reward": after, "kl_to_reference": kls[-1] if kls else 0.0, "max_kl": max(kls) if kls else 0.0},
    }


# ----------------------------------------------------------------------------- distillation


def run_distill(cfg: AlignConfig, device, run: Path, resume: str | None = None) -> dict:
    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.model import build_model

    teacher_path = cfg.model.teacher
    if not teacher_path:
        raise LmforgeError("distill needs model.teacher (the teacher model folder)")
    teacher = load_model(teacher_path).to(device).eval().requires_grad_(False)
    tok = load_tokenizer_if_any(teacher_path)
    if cfg.model.path:
        student = load_model(cfg.model.path)
    else:  # a fresh student, seeded apart from the teacher's initialisation
        torch.manual_seed(cfg.train.seed + 1)
        student = build_model(cfg.model.preset, vocab_size=teacher.config.vocab_size)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise LmforgeError(f"student vocab {student.config.vocab_size} != teacher vocab {teacher.config.vocab_size}")
    student.to(device).train()
    windows = _distill_windows(cfg, tok, teacher.config.vocab_size)
    held, train = windows[:16].to(device), windows[16:].to(device)
    dc, tc = cfg.distill, cfg.train

    def agreement() -> float:
        with torch.no_grad():
            return float((student(held).argmax(-1) == teacher(held).argmax(-1)).float().mean())

    def loss_fn(b: dict):
        x = b["input_ids"]
        with torch.no_grad():
            t_logits = teacher(x)
        return A.distill_loss(student(x), t_logits, temperature=dc.temperature, kind=dc.kind), {}

    before = agreement()
    _fit(
        student,
        _optimizer(student, cfg),
        loss_fn,
        lambda step: {"input_ids": train[_batches(len(train), tc.batch_size, step, tc.seed)]},
        run,
        tc.steps,
        cfg,
        resume,
        tok,
    )
    after = agreement()
    _save(student, tok, run)
    return {"before": {"greedy_agreement": before}, "after": {"greedy_agreement": after}}


def _distill_windows(cfg: AlignConfig, tok, vocab: int) -> torch.Tensor:
    """Token windows of the task text (or random ids without a tokenizer) to match the teacher on."""
    L = cfg.distill.seq_len
    n = cfg.task.train_size + 16
    if tok is None:
        return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(0))
    from lmforge.train.stdlib_data import builtin_sft_examples

    text = " ".join(e["prompt"] + " " + e["response"] for e in builtin_sft_examples(max_bytes=400_000)["train"])
    ids = torch.tensor(tok.encode(text)[: n * L])
    if len(ids) < 17 * L:
        raise LmforgeError("not enough text to distill on")
    return ids[: len(ids) // L * L].view(-1, L)


RUNNERS = {
    "rlaif": run_rlaif,
    "dpo": run_dpo,
    "reward": run_reward,
    "grpo": run_grpo,
    "ppo": run_ppo,
    "distill": run_distill,
}
