"""The threads policy (lmforge.common.apply_threads_policy): OpenMP's wait settings are in the
environment before torch loads in `python -m lmforge ...` and in the serving engine's process, a
value the user set is kept, and LMFORGE_THREADS_POLICY=off turns it off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.common import THREADS_POLICY_VAR, LmforgeError, apply_threads_policy

KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", THREADS_POLICY_VAR)
ROOT = Path(__file__).resolve().parents[1]
POLICY = apply_threads_policy({})  # what the policy sets where the user set nothing

# Runs `python -m lmforge pretrain --help` (its recipe imports torch) and reports the OpenMP settings
# in the environment at the moment torch is first imported, seen by an import hook.
PROBE = f"""
import atexit, importlib.abc, json, os, runpy, sys
seen = {{}}
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and name not in seen:
            seen[name] = {{k: os.environ.get(k) for k in {KNOBS!r}}}
sys.meta_path.insert(0, Hook())
atexit.register(lambda: print("PROBE=" + json.dumps(seen.get("torch"))))
sys.argv = ["lmforge", "pretrain", "--help"]
runpy.run_module("lmforge", run_name="__main__", alter_sys=True)
"""


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _env_when_torch_loads(env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("PROBE=")][-1]
    seen = json.loads(line[len("PROBE=") :])
    assert seen is not None, "the command never imported torch: the probe saw nothing"
    return seen


def test_the_policy_sets_a_short_spin_unless_the_user_chose():
    assert POLICY.get("GOMP_SPINCOUNT") and int(POLICY["GOMP_SPINCOUNT"]) < 300_000  # libgomp's default spin
    env: dict[str, str] = {}
    assert apply_threads_policy(env) == POLICY and env == POLICY
    for user in (
        {"OMP_WAIT_POLICY": "ACTIVE"},
        {"GOMP_SPINCOUNT": "5"},
        {THREADS_POLICY_VAR: "off"},
        {THREADS_POLICY_VAR: "OFF", "PATH": "/bin"},
    ):
        env = dict(user)
        assert apply_threads_policy(env) == {} and env == user
    env = {THREADS_POLICY_VAR: "on"}
    assert apply_threads_policy(env) == POLICY and env == {THREADS_POLICY_VAR: "on", **POLICY}
    with pytest.raises(LmforgeError, match=f"{THREADS_POLICY_VAR}='sometimes'"):
        apply_threads_policy({THREADS_POLICY_VAR: "sometimes"})


def test_python_m_lmforge_sets_it_before_torch_loads():
    seen = _env_when_torch_loads(_clean_env())
    assert {k: v for k, v in seen.items() if v is not None} == POLICY


def test_python_m_lmforge_keeps_the_users_setting():
    seen = _env_when_torch_loads(_clean_env(OMP_WAIT_POLICY="ACTIVE"))
    assert {k: v for k, v in seen.items() if v is not None} == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_a_bad_switch_value_is_a_clear_cli_error(monkeypatch, capsys):
    from lmforge.cli import main

    monkeypatch.setenv(THREADS_POLICY_VAR, "maybe")
    assert main(["pretrain", "--help"]) == 2
    assert f"{THREADS_POLICY_VAR}='maybe'" in capsys.readouterr().err


def test_the_engine_process_gets_the_policy(monkeypatch):
    from lmforge.serve import ServeConfig, engine_process

    class Started(Exception):
        pass

    def popen(cmd, **kwargs):  # the engine's interpreter starts with exactly this environment
        seen.update(kwargs["env"])
        raise Started

    for k in KNOBS:  # a server built from Python (no CLI): this process never applied the policy
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(engine_process.subprocess, "Popen", popen)
    for user, expected in (({}, POLICY), ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"})):
        for k, v in user.items():
            monkeypatch.setenv(k, v)
        seen: dict[str, str] = {}
        with pytest.raises(Started):
            engine_process.EngineProcess(ServeConfig(model="unused"), max_in_flight=2)
        assert seen["PATH"] == os.environ["PATH"] and {k: seen[k] for k in KNOBS if k in seen} == expected
    assert "GOMP_SPINCOUNT" not in os.environ  # the server's own environment is left as it was
