"""Tool-using agents: a ReAct loop over OpenAI tool calling, against any OpenAI-compatible endpoint
or a local lmforge model; built-in verifiable tasks; a tiny model taught to call the calculator.

    lmforge agent run "What is 123 * 456?" --endpoint http://localhost:8000 --tools calculator
    lmforge agent run "What does notes.md say about X?" --model runs/x/final --tools files --files docs/
    lmforge agent run "..." --endpoint URL --model NAME --pattern plan|reflect|debate --trace run.jsonl
    lmforge agent run "..." --endpoint URL --user-tools my_tools.py    # typed functions become tools
    lmforge agent eval --endpoint URL --kinds arithmetic,file,code --n 10 --out runs/agent-eval
    lmforge agent train --out runs/agent-calc --grpo-steps 40   # SFT on synthetic traces, GRPO, measured

`--model` is a model folder, or with `--endpoint` the served model's name (default: the first listed).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from pathlib import Path

from lmforge.common import LmforgeError, atomic_write_json, get_logger, seed_everything

log = get_logger("lmforge.agent")
PATTERNS = ("react", "plan", "reflect", "debate")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="an OpenAI-compatible server URL (chat completions with tools)")
    p.add_argument("--model", help="a local model folder; with --endpoint, the served model's name")
    p.add_argument("--api-key", default="EMPTY", help="the endpoint's API key (default: %(default)s)")
    p.add_argument("--device", help="device of a local model (default: best available)")
    p.add_argument("--max-steps", type=int, default=8, help="model calls per run (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8192, help="prompt + completion tokens per run")
    p.add_argument("--max-seconds", type=float, default=300.0, help="wall time per run (default: %(default)s)")
    p.add_argument("--turn-tokens", type=int, default=256, help="new tokens per model call (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--tool-choice", choices=["auto", "required", "none"], default="auto", help="for the first step (then auto)"
    )
    p.add_argument("--no-parallel-calls", action="store_true", help="at most one tool call per step")
    p.add_argument("--trace", help="write the run's events to this JSONL file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    r = sub.add_parser("run", help="run one task with tools until the model answers")
    r.add_argument("task", help="what to do (the user message)")
    _add_model(r)
    r.add_argument("--tools", default="calculator", help="comma-separated: calculator,python,files,rag ('' for none)")
    r.add_argument("--files", help="the folder the files tool may read (nothing outside it)")
    r.add_argument("--index", help="an index folder (`lmforge rag index`) for the rag tool")
    r.add_argument("--user-tools", metavar="FILE.py", help="a Python file: its public typed functions become tools")
    r.add_argument("--pattern", choices=PATTERNS, default="react", help="react (default), plan, reflect, debate")
    r.add_argument("--rounds", type=int, default=2, help="rounds of reflect/debate (default: %(default)s)")
    r.add_argument("--system", help="a system prompt")
    r.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="the run's summary as JSON: to FILE, or with no value to stdout instead of the answer",
    )

    e = sub.add_parser("eval", help="success rate on built-in verifiable tasks (calculator, files, rag, code)")
    _add_model(e)
    e.add_argument("--kinds", default="arithmetic,file,code", help="comma-separated: arithmetic,file,rag,code")
    e.add_argument("--n", type=int, default=5, help="tasks per kind (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-tools-baseline", action="store_true", help="also run every task with no tools")
    e.add_argument("-o", "--out", required=True, help="folder for report.json and trace.jsonl")

    t = sub.add_parser("train", help="teach a tiny model to call the calculator (SFT on synthetic traces)")
    t.add_argument("-o", "--out", required=True, help="run folder (the model goes to OUT/final)")
    t.add_argument("--steps", type=int, default=600, help="optimizer steps (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--train-size", type=int, default=4000, help="synthetic training conversations")
    t.add_argument("--eval-size", type=int, default=100, help="held-out multiplications measured")
    t.add_argument("--phrasings", type=int, default=1, help="question phrasings used, 1-4 (default: %(default)s)")
    t.add_argument("--hidden-size", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--grpo-steps", type=int, default=0, help="GRPO steps on the tool call after SFT (default: 0)")
    t.add_argument("--group-size", type=int, default=8, help="GRPO samples per question (default: %(default)s)")
    t.add_argument("--grpo-prompts", type=int, default=8, help="GRPO questions per step (default: %(default)s)")
    t.add_argument("--grpo-lr", type=float, default=5e-4)
    t.add_argument("--kl-coef", type=float, default=0.05, help="GRPO KL penalty to the SFT model")
    t.add_argument("--init", help="continue from this model folder (an earlier `agent train` run's OUT/final)")
    t.add_argument("--device", help="training device (default: best available)")


def main(args: argparse.Namespace) -> int:
    return {"run": cmd_run, "eval": cmd_eval, "train": cmd_train}[args.action](args)


# ----------------------------------------------------------------------------- run / eval


def load_chat_model(args: argparse.Namespace):
    from lmforge.agent.models import EndpointChat, LocalChat

    if args.endpoint:
        return EndpointChat(args.endpoint, model=args.model or "default", api_key=args.api_key)
    if not args.model:
        raise LmforgeError("give --model DIR (a local model) or --endpoint URL (an OpenAI-compatible server)")
    return LocalChat.load(args.model, device=args.device)


def agent_config(args: argparse.Namespace, system: str | None = None):
    from lmforge.agent.loop import AgentConfig

    return AgentConfig(
        max_steps=args.max_steps,
        max_tokens=args.max_tokens,
        max_seconds=args.max_seconds,
        turn_tokens=args.turn_tokens,
        temperature=args.temperature,
        tool_choice=args.tool_choice,
        system=system,
        parallel_tool_calls=not args.no_parallel_calls,
    )


def user_tools(path: str) -> list:
    """The public functions defined in a Python file, as tools (schema from their type hints)."""
    from lmforge.agent.schema import Tool

    file = Path(path)
    if not file.is_file():
        raise LmforgeError(f"--user-tools {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"lmforge_user_tools_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001  (the user's file: report it in one line)
        raise LmforgeError(f"--user-tools {path}: importing it failed: {type(e).__name__}: {e}") from None
    fns = [
        f
        for name, f in vars(module).items()
        if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")
    ]
    if not fns:
        raise LmforgeError(f"--user-tools {path}: defines no public function")
    return [Tool.from_function(f) for f in fns]


def cmd_run(args: argparse.Namespace) -> int:
    from lmforge.agent import patterns
    from lmforge.agent.loop import Trace, run_agent
    from lmforge.agent.tools import builtin_tools

    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    if args.files and "files" not in names:
        raise LmforgeError("--files is given but the files tool is not in --tools")
    if args.index and "rag" not in names:
        raise LmforgeError("--index is given but the rag tool is not in --tools")
    tools = builtin_tools(names, files=args.files, index=args.index)
    if args.user_tools:
        tools += user_tools(args.user_tools)
    if args.pattern in ("react", "plan") and args.rounds != 2:
        raise LmforgeError(f"--rounds is for --pattern reflect or debate, not {args.pattern}")
    model = load_chat_model(args)
    cfg, trace = agent_config(args, args.system), Trace(args.trace)
    if args.pattern == "react":
        res = run_agent(model, args.task, tools, cfg, trace)
        if res.stop_reason == "model_error":
            raise LmforgeError(f"the model failed after {res.steps} steps: {res.error}")
        summary = res.summary()
    elif args.pattern == "plan":
        summary = patterns.plan_then_execute(model, args.task, tools, cfg, trace).summary()
    elif args.pattern == "reflect":
        summary = patterns.reflect(model, args.task, tools, cfg, trace, rounds=args.rounds).summary()
    else:
        summary = patterns.debate(model, args.task, tools, cfg, trace, rounds=args.rounds).summary()
    if args.json and args.json != "-":
        atomic_write_json(args.json, summary)
    if args.json == "-":
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(summary["answer"] if summary["answer"] is not None else f"(no answer: {summary.get('stop_reason')})")
        print(f"[{summary['steps']} steps, {summary['tokens']} tokens]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.agent.tasks import KINDS, builtin_tasks, evaluate

    out = Path(args.out)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS] or ([] if kinds else ["(none)"])
    if bad:
        raise LmforgeError(f"--kinds: unknown agent task kind {bad[0]!r} (choose from {', '.join(KINDS)})")
    if args.n < 1:
        raise LmforgeError(f"--n must be >= 1, got {args.n}")
    model, cfg = load_chat_model(args), agent_config(args)
    tasks = builtin_tasks(kinds, args.n, args.seed, out / "work")
    report = {
        "model": model.name,
        "with_tools": evaluate(model, tasks, out / "work", cfg, args.trace or out / "trace.jsonl"),
    }
    if args.no_tools_baseline:
        report["no_tools"] = evaluate(model, tasks, out / "work", cfg, out / "trace-no-tools.jsonl", with_tools=False)
    atomic_write_json(out / "report.json", report)
    for name in ("with_tools", "no_tools"):
        for kind, row in report.get(name, {}).get("kinds", {}).items():
            print(
                f"{name:10s} {kind:10s} success {row['success_rate']:.0%} of {row['n']}  "
                f"steps/success {row['steps_per_success']}  tokens/success {row['tokens_per_success']}"
            )
    return 0


# ----------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    """Synthetic traces -> tokenizer -> a small model -> SFT (masked cross-entropy) -> optional GRPO on
    the tool call (verifiable reward) -> the held-out success rate with the calculator and with none."""
    import time

    from lmforge.agent.models import LocalChat
    from lmforge.agent.traces import (
        QUESTIONS,
        calculator_tools,
        calculator_trace,
        encode_trace,
        measure_tool_use,
        split_pairs,
    )
    from lmforge.checkpoint import load_model, load_tokenizer_if_any, save_model
    from lmforge.common import get_device
    from lmforge.model import build_model
    from lmforge.tokenizer import train_tokenizer
    from lmforge.tokenizer.chat import TOOLS_POSTAMBLE, TOOLS_PREAMBLE

    for flag in ("batch_size", "train_size", "eval_size", "hidden_size", "layers", "group_size", "grpo_prompts"):
        if getattr(args, flag) < 1:
            raise LmforgeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.steps < (0 if args.init else 1) or args.grpo_steps < 0:
        raise LmforgeError(
            f"--steps must be >= 1 (>= 0 with --init), --grpo-steps >= 0; got {args.steps}, {args.grpo_steps}"
        )
    if not 1 <= args.phrasings <= len(QUESTIONS):
        raise LmforgeError(f"--phrasings must be 1-{len(QUESTIONS)}, got {args.phrasings}")
    seed_everything(args.seed)
    out, device, t0 = Path(args.out), get_device(args.device), time.time()
    train_pairs, held = split_pairs(args.train_size, args.eval_size, args.seed)
    tools = calculator_tools()
    if args.init:
        tok = load_tokenizer_if_any(args.init) if Path(args.init).is_dir() else None
        if tok is None:
            raise LmforgeError(f"--init {args.init}: not a model folder with a tokenizer")
    else:
        # The tokenizer learns the template and tool words but no digit merges (its corpus holds no
        # numbers): every digit stays one token, so copying numbers is one token at a time.
        words = [
            TOOLS_PREAMBLE + "\n" + json.dumps(tools[0]) + TOOLS_POSTAMBLE,
            *(q.format(a="", b="") for q in QUESTIONS),
        ]
        tok = train_tokenizer(words * 50 + ['{"name": "calculator", "arguments": {"expression": " * "}}'] * 50, 512)
    data = [
        encode_trace(tok, calculator_trace(a, b, k % args.phrasings), tools) for k, (a, b) in enumerate(train_pairs)
    ]
    longest = max(len(ids) for ids, _ in data)
    if args.init:
        model = load_model(args.init, device=device)
    else:
        model = build_model(
            "tiny",
            vocab_size=tok.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.hidden_size * 8 // 3 // 8 * 8,
            num_hidden_layers=args.layers,
            max_position_embeddings=max(512, 1 << (longest + 64).bit_length()),
        ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"{len(data)} traces of up to {longest} tokens; {n_params:,} parameters")
    results: dict = {"init": args.init, "parameters": n_params, "train_traces": len(data), "phrasings": args.phrasings}
    results["sft"] = sft_stage(model, tok, data, args, device) if args.steps else None
    results["grpo"] = grpo_stage(model, tok, train_pairs, args, device) if args.grpo_steps else None
    model.eval()
    final = save_model(model, out / "final", tokenizer=tok)
    chat = LocalChat(model, tok, "agent-calc")
    results["train_seconds"] = round(time.time() - t0, 1)
    results["held_out"] = len(held)
    results["with_tool"] = measure_tool_use(chat, held, True, args.phrasings)
    results["without_tool"] = measure_tool_use(chat, held, False, args.phrasings)
    results["model"] = str(final)
    atomic_write_json(out / "results.json", results)
    print(json.dumps(results, indent=2))
    return 0


def _common_prefix(rows: list[list[int]]) -> int:
    """The length of the token prefix all rows share, less one (each row keeps a token of its own)."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for r in rows[1:]:
        n = next((i for i in range(n) if r[i] != first[i]), n)
    return n


def _prefixed_logits(model, prefix: list[int], rows):
    """logits [B, T, V] of `rows` [B, T] (right-padded) continuing one shared `prefix`. Every trace
    starts with the same system turn (the tool listing, ~200 tokens): it runs once, for one row, and
    its keys/values are shared by the batch (gradients flow through them), so a step costs the
    prefix once plus B short suffixes instead of B whole conversations (equal logits: a KV cache)."""
    import torch

    from lmforge.model import KVCache

    cache = KVCache.for_model(model, 1, len(prefix) + rows.shape[1])
    model(torch.tensor([prefix], device=rows.device), kv_cache=cache, start_pos=0, logits_to_keep=1)
    cache.select_rows(torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device))
    return model(rows, kv_cache=cache, start_pos=len(prefix))


def _pad(rows: list[list[int]], value: int, device):
    import torch

    T = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (T - len(r)) for r in rows], device=device)


def sft_stage(model, tok, data: list[tuple[list[int], list[int]]], args, device) -> dict:
    """SFT written out: random batches, masked cross-entropy on the assistant's tokens."""
    import random
    import time

    import torch
    import torch.nn.functional as F

    from lmforge.train.objectives import IGNORE

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    # linear warmup, then a linear decay to a tenth: the last steps sharpen what was learned
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / args.steps))
    rng, t0, P = random.Random(args.seed), time.time(), _common_prefix([ids for ids, _ in data])
    model.train()
    for step in range(1, args.steps + 1):
        batch = rng.sample(data, min(args.batch_size, len(data)))
        ids = _pad([i[P:] for i, _ in batch], tok.pad_id or 0, device)
        labels = _pad([lab[P:] for _, lab in batch], IGNORE, device)
        logits = _prefixed_logits(model, data[0][0][:P], ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            log.info(f"sft step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return {"steps": args.steps, "final_loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)}


def grpo_stage(model, tok, pairs: list[tuple[int, int]], args, device) -> dict:
    """GRPO written out on both assistant turns: `group_size` samples per question and turn at
    temperature 1, verifiable rewards (`call_reward`: the call computes A * B; `answer_reward`: after
    the tool's result, the answer's last number is A * B), advantages relative to the group, one
    policy-gradient step per rollout (lmforge.train.align's clipped loss) with a KL penalty to the
    model as it was before GRPO."""
    import copy
    import random
    import time

    import torch

    from lmforge.agent.traces import answer_reward, calculator_tools, calculator_trace, call_reward, prompt_ids
    from lmforge.infer.generate import generate
    from lmforge.tokenizer.text import end_of_turn_ids
    from lmforge.train import align as A

    turns = {"call": 1, "answer": 3}  # the turn -> how many messages of the trace come before it
    tools, stops, G = calculator_tools(), end_of_turn_ids(tok), args.group_size
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.grpo_lr, weight_decay=0.0)
    rng, t0, rewards_seen = random.Random(args.seed + 1), time.time(), []
    for step in range(1, args.grpo_steps + 1):
        picked = [(k, *pairs[k]) for k in rng.sample(range(len(pairs)), min(args.grpo_prompts, len(pairs)))]
        asks = [(turn, a, b, calculator_trace(a, b, k % args.phrasings)) for k, a, b in picked for turn in turns]
        asks = [ask for ask in asks for _ in range(G)]  # each (question, turn) a group of G samples
        prompts = [prompt_ids(tok, conv[: turns[turn]], tools) for turn, _, _, conv in asks]
        model.eval()
        new = generate(model, prompts, 48, temperature=1.0, seed=args.seed + step, stop_token_ids=stops).tolist()
        model.train()
        done = [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in new]
        texts = [tok.decode([t for t in c if t not in stops]) for c in done]
        rewards = [
            (call_reward if turn == "call" else answer_reward)(t, a, b) for t, (turn, a, b, _) in zip(texts, asks)
        ]
        rewards = torch.tensor(rewards, device=device)
        rewards_seen.append(float(rewards.mean()))
        P = _common_prefix(prompts)
        ids = _pad([p[P:] + c for p, c in zip(prompts, done)], tok.pad_id or 0, device)
        mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=device)
        for i, (p, c) in enumerate(zip(prompts, done)):  # logp[:, t] scores ids[:, t + 1]
            mask[i, len(p) - P - 1 : len(p) - P - 1 + len(c)] = 1
        adv = A.grpo_advantages(rewards, G)[:, None] * mask
        with torch.no_grad():
            ref_logp = A.token_logprobs(_prefixed_logits(ref, prompts[0][:P], ids), ids)
        logp = A.token_logprobs(_prefixed_logits(model, prompts[0][:P], ids), ids)
        kl = (A.kl_penalty(logp, ref_logp) * mask).sum() / mask.sum().clamp(min=1)
        loss = A.ppo_policy_loss(logp, logp.detach(), adv, mask) + args.kl_coef * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 5 == 0 or step == args.grpo_steps:
            log.info(f"grpo step {step}/{args.grpo_steps} mean reward {rewards_seen[-1]:.3f} kl {kl.item():.2e}")
    return {
        "steps": args.grpo_steps,
        "first_mean_reward": rewards_seen[0],
        "last_mean_reward": rewards_seen[-1],
        "seconds": round(time.time() - t0, 1),
    }
