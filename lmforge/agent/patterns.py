"""Planning and multi-agent work as plain loops over `run_agent` (loop.py):

- `plan_then_execute`: a planner call writes numbered steps; each step runs as its own agent run
  (with the task, the plan and the results so far); a last call writes the answer from the results.
- `reflect`: answer, critique (a `check` function when the task is verifiable, else the model
  critiquing itself), and retry with the critique until it passes or `rounds` run out.
- `debate`: a solver and a critic (another model, or the same one under another system prompt,
  both with the tools) take turns; the solver revises until the critic agrees or `rounds` run out.

Each returns a `PatternResult`: the answer, every agent run, and the steps and tokens of them all.
All events go to one shared trace, each tagged with the agent that made it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.common import LmforgeError

from .loop import AgentConfig, AgentResult, Trace, run_agent
from .models import ChatModel
from .schema import Tool

PLANNER = (
    "You plan before acting. Break the user's task into at most {n} short, numbered steps "
    "(one per line, '1. ...'). Reply with the list only."
)
WRITER = "Write the final answer to the task from the step results. Reply with the answer only."
CRITIC = (
    "You check another assistant's answer to a task. Use the tools to verify it. If it is correct, "
    "reply with exactly {ok}. Otherwise explain briefly what is wrong."
)
SELF_CRITIC = (
    "Check the answer below to the task. If it is correct, reply with exactly {ok}. Otherwise say what is wrong."
)
OK = "AGREE"


@dataclass
class PatternResult:
    answer: str | None
    runs: list[AgentResult] = field(default_factory=list)
    rounds: int = 0
    plan: list[str] = field(default_factory=list)
    critiques: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.runs)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    def summary(self) -> dict:
        return {
            "answer": self.answer,
            "rounds": self.rounds,
            "steps": self.steps,
            "tokens": self.tokens,
            "plan": self.plan,
            "critiques": self.critiques,
            "stop_reasons": [r.stop_reason for r in self.runs],
        }


def _no_tools(cfg: AgentConfig, system: str) -> AgentConfig:
    return dataclasses.replace(cfg, system=system, tool_choice="auto")


def parse_plan(text: str, max_steps: int) -> list[str]:
    """The numbered (or bulleted) lines of a plan; the whole text as one step when there are none."""
    steps = [m.group(1).strip() for m in re.finditer(r"^\s*(?:\d+[.)]|[-*])\s+(.+)$", text or "", re.MULTILINE)]
    return (steps or ([text.strip()] if text and text.strip() else []))[:max_steps]


def plan_then_execute(
    model: ChatModel,
    task: str,
    tools: list[Tool],
    config: AgentConfig | None = None,
    trace: Trace | None = None,
    max_plan_steps: int = 5,
) -> PatternResult:
    cfg, trace = config or AgentConfig(), trace or Trace()
    out = PatternResult(None)
    plan = run_agent(model, task, [], _no_tools(cfg, PLANNER.format(n=max_plan_steps)), trace, "planner")
    out.runs.append(plan)
    out.plan = parse_plan(plan.answer or "", max_plan_steps)
    if not out.plan:
        raise LmforgeError("the planner wrote no plan (" + plan.stop_reason + ")")
    listing = "\n".join(f"{i}. {s}" for i, s in enumerate(out.plan, 1))
    results: list[str] = []
    for i, step in enumerate(out.plan, 1):
        done = "\n".join(f"Step {k} result: {r}" for k, r in enumerate(results, 1)) or "(nothing yet)"
        prompt = f"Task: {task}\n\nPlan:\n{listing}\n\nDone so far:\n{done}\n\nNow do step {i} only: {step}"
        run = run_agent(model, prompt, tools, cfg, trace, f"executor-{i}")
        out.runs.append(run)
        results.append(run.answer if run.answer is not None else f"(not finished: {run.stop_reason})")
        out.rounds = i
    summary = "\n".join(f"Step {k} ({s}): {r}" for k, (s, r) in enumerate(zip(out.plan, results), 1))
    final = run_agent(model, f"Task: {task}\n\nStep results:\n{summary}", [], _no_tools(cfg, WRITER), trace, "writer")
    out.runs.append(final)
    out.answer = final.answer
    return out


def retry_prompt(task: str, answer: str | None, critique: str) -> str:
    """The task again, with the last answer and what was wrong with it."""
    return f"{task}\n\nYour previous answer was: {answer}\nIt was judged wrong: {critique}\nTry again."


def _agrees(text: str | None, ok: str) -> bool:
    return bool(text) and text.strip().strip(".!").upper().startswith(ok)


def reflect(
    model: ChatModel,
    task: str,
    tools: list[Tool],
    config: AgentConfig | None = None,
    trace: Trace | None = None,
    check: Callable[[str], str | None] | None = None,
    rounds: int = 3,
) -> PatternResult:
    """`check(answer)` -> None when the answer is right, else what is wrong (a verifier); without
    one the model critiques its own answer (self-critique, no tools)."""
    cfg, trace = config or AgentConfig(), trace or Trace()
    out, prompt = PatternResult(None), task
    for r in range(1, rounds + 1):
        run = run_agent(model, prompt, tools, cfg, trace, f"attempt-{r}")
        out.runs.append(run)
        out.answer, out.rounds = run.answer, r
        if check is not None:
            critique = check(run.answer or "")
        else:
            shown = f"Task: {task}\n\nAnswer: {run.answer}"
            judge = run_agent(model, shown, [], _no_tools(cfg, SELF_CRITIC.format(ok=OK)), trace, f"critic-{r}")
            out.runs.append(judge)
            critique = None if _agrees(judge.answer, OK) else (judge.answer or "(no critique)")
        trace.add("critique", agent=f"critic-{r}", round=r, critique=critique)
        if critique is None:
            break
        out.critiques.append(critique)
        prompt = retry_prompt(task, run.answer, critique)
    return out


def debate(
    model: ChatModel,
    task: str,
    tools: list[Tool],
    config: AgentConfig | None = None,
    trace: Trace | None = None,
    critic: ChatModel | None = None,
    rounds: int = 2,
) -> PatternResult:
    """Solver and critic take turns (the critic may be another model); ends when the critic agrees."""
    cfg, trace = config or AgentConfig(), trace or Trace()
    critic_cfg = dataclasses.replace(cfg, system=CRITIC.format(ok=OK), tool_choice="auto")
    out, prompt = PatternResult(None), task
    for r in range(1, rounds + 1):
        solve = run_agent(model, prompt, tools, cfg, trace, f"solver-{r}")
        out.runs.append(solve)
        out.answer, out.rounds = solve.answer, r
        review = run_agent(
            critic or model, f"Task: {task}\n\nAnswer to check: {solve.answer}", tools, critic_cfg, trace, f"critic-{r}"
        )
        out.runs.append(review)
        if _agrees(review.answer, OK):
            break
        out.critiques.append(review.answer or f"(no critique: {review.stop_reason})")
        prompt = retry_prompt(task, solve.answer, out.critiques[-1])
    return out
