"""L5: tool-using agents over OpenAI tool calling. A ReAct loop (loop.py) against any
OpenAI-compatible endpoint or a local lmforge model (models.py); built-in tools (tools.py:
calculator, sandboxed Python, files in one folder, rag search) and user tools derived from typed
Python functions (schema.py); plan-then-execute, reflection and debate as plain loops
(patterns.py); verifiable tasks and their evaluation (tasks.py); synthetic tool-use traces for
training a model to call the calculator (traces.py).

    from lmforge.agent import AgentConfig, EndpointChat, Tool, builtin_tools, run_agent
    model = EndpointChat("http://localhost:8000")
    result = run_agent(model, "What is 123 * 456?", builtin_tools(["calculator"]), trace="run.jsonl")
"""

from __future__ import annotations

_LAZY = {
    "AgentConfig": "lmforge.agent.loop",
    "AgentResult": "lmforge.agent.loop",
    "Trace": "lmforge.agent.loop",
    "run_agent": "lmforge.agent.loop",
    "Tool": "lmforge.agent.schema",
    "ToolError": "lmforge.agent.schema",
    "function_schema": "lmforge.agent.schema",
    "builtin_tools": "lmforge.agent.tools",
    "calculate": "lmforge.agent.tools",
    "EndpointChat": "lmforge.agent.models",
    "LocalChat": "lmforge.agent.models",
    "Reply": "lmforge.agent.models",
    "plan_then_execute": "lmforge.agent.patterns",
    "reflect": "lmforge.agent.patterns",
    "debate": "lmforge.agent.patterns",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmforge.agent' has no attribute {name!r}")
