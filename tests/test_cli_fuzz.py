"""Property-based fuzzing of the CLI's config values and flags (issue 17): for pretrain, sft, data
prepare, generate and quantize, run `lmforge.cli.main` in-process with random values of wrong types
and out of range; each must be refused with exit status 2, a message naming the field or flag, and
no traceback, and in-range values must run (exit 0).

The bad values come from the config dataclasses' own annotations and declared rules (every field of
every section, not a hand-picked few), so a field added later is fuzzed too."""

import dataclasses
import itertools
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.data.config import DataConfig
from lmforge.model import ModelConfig, Transformer
from lmforge.recipes._common import RunConfig
from lmforge.recipes.pretrain import DataConfig as PretrainData
from lmforge.recipes.sft import ModelSource, PeftSection, SFTData
from lmforge.train import OptimConfig, TrainConfig

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Letters that spell no YAML 1.1 boolean/null (yes/no/on/off/true/false/null/y/n) and no number.
WORDS = st.text(alphabet="abcdkqxz", min_size=2, max_size=6)


def _allows(tp, kind) -> bool:
    return tp is kind or kind in typing.get_args(tp)


def bad_values(tp, rules: dict) -> st.SearchStrategy | None:
    """Values no field of annotation `tp` with `rules` accepts (None if the field takes anything)."""
    options = [st.just([[1], {"a": 1}])]  # a nested list of a list and a mapping fits no scalar or list[str]
    if _allows(tp, int) or _allows(tp, float):
        options += [WORDS, st.just(".nan"), st.just({"a": 1})]
        if "ge" in rules:
            options.append(st.integers(max_value=-1).map(lambda x: rules["ge"] + x))
        if "gt" in rules:
            options.append(st.integers(max_value=0).map(lambda x: rules["gt"] + x))
        if "le" in rules:
            options.append(st.integers(min_value=1, max_value=100).map(lambda x: rules["le"] + x))
        if "lt" in rules:
            options.append(st.integers(min_value=0, max_value=100).map(lambda x: rules["lt"] + x))
        if _allows(tp, int) and not _allows(tp, float):
            options.append(st.floats(0.1, 0.9).map(lambda x: 3 + x))
    elif _allows(tp, bool):
        options.append(WORDS)
    elif "choices" in rules:
        options.append(WORDS.filter(lambda w: w not in rules["choices"]))
    elif "pattern" in rules:
        options.append(st.just("a/b" if "/" in rules["pattern"] else "qq"))
    if typing.get_origin(tp) is tuple or tp is tuple:
        options = [WORDS, st.just(5), st.just([0.5]), st.just([2, 3])]
    return st.one_of(options)


def fields_of(cls, prefix: str) -> list[tuple[str, st.SearchStrategy]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp in (dict, typing.Any):
            continue  # a section / free mapping: its own fields are fuzzed where they are checked
        strategy = bad_values(tp, f.metadata.get("rules", {}))
        if strategy is not None:
            out.append((f"{prefix}.{f.name}".lstrip("."), strategy))
    return out


def as_text(value) -> str:
    return (
        value
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )


def assert_refused(capsys, argv: list[str], name: str) -> None:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, (argv, code, err[-500:])
    assert name in err, (name, err[-500:])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.preset("tiny", max_position_embeddings=64)), path / "ckpt")
    return path


PRETRAIN = (
    fields_of(TrainConfig, "train")
    + fields_of(OptimConfig, "optim")
    + fields_of(PretrainData, "data")
    + fields_of(RunConfig, "run")
    + fields_of(ModelConfig, "model")
)
TINY_DATA = ["--set", "data.max_bytes=100000", "--set", "data.vocab_size=300"]  # built once, cached in workdir
SFT = (
    fields_of(TrainConfig, "train")
    + fields_of(OptimConfig, "optim")
    + fields_of(SFTData, "data")
    + fields_of(PeftSection, "peft")
    + fields_of(ModelSource, "model")
    + fields_of(RunConfig, "run")
)


def _data_fields():
    hints = typing.get_type_hints(DataConfig)
    out = fields_of(DataConfig, "")
    for f in dataclasses.fields(DataConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            out += fields_of(hints[f.name], f.name)
    return out


DATA = _data_fields()


def bad_setting(fields):
    return st.sampled_from(fields).flatmap(lambda kv: kv[1].map(lambda v: (kv[0], v)))


@FUZZ
@given(bad=bad_setting(PRETRAIN))
def test_pretrain_refuses_bad_values(bad, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    key, value = bad
    assert_refused(capsys, ["pretrain", *TINY_DATA, "--set", "train.steps=1", "--set", f"{key}={as_text(value)}"], key)


@FUZZ
@given(bad=bad_setting(SFT))
def test_sft_refuses_bad_values(bad, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    key, value = bad
    assert_refused(capsys, ["sft", "--set", "train.steps=1", "--set", f"{key}={as_text(value)}"], key)


@FUZZ
@given(bad=bad_setting(DATA))
def test_data_prepare_refuses_bad_values(bad, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    key, value = bad
    assert_refused(
        capsys, ["data", "prepare", "--no-progress", "-o", "data-out", "--set", f"{key}={as_text(value)}"], key
    )
    assert not (workdir / "data-out").exists()


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lr=st.floats(1e-6, 1e-2).map(lambda x: f"{x:.0e}"), batch=st.integers(1, 2), accum=st.integers(1, 2))
def test_pretrain_runs_in_range_values_written_any_way(lr, batch, accum, workdir, capsys, monkeypatch):
    """ "3e-04" (a string to YAML 1.1) is the number; in-range values train (exit 0)."""
    monkeypatch.chdir(workdir)
    code = main(
        [
            "pretrain",
            "--lr",
            lr,
            "--batch-size",
            str(batch),
            "--grad-accum",
            str(accum),
            "--steps",
            "1",
            "--seq-len",
            "16",
            *TINY_DATA,
            "--set",
            "train.eval_every=0",
            "--set",
            "train.save_every=0",
            "--name",
            "ok",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err[-500:]


GENERATE_FLAGS = {
    "--max-new-tokens": st.one_of(st.integers(max_value=-1).map(str), st.integers(65, 10**12).map(str), WORDS),
    "--temperature": st.one_of(st.floats(max_value=-1e-3).map(str), st.just("nan"), WORDS),
    "--top-p": st.one_of(st.floats(1.001, 1e6).map(str), st.floats(-10, 0).map(str), WORDS),
    "--top-k": st.one_of(st.integers(max_value=-1).map(str), WORDS, st.just("1.5")),
    "--repetition-penalty": st.one_of(st.floats(-10, 0).map(str), st.just("inf"), WORDS),
    "--num-speculative": st.one_of(st.integers(max_value=0).map(str), WORDS),
    "--seed": st.one_of(st.integers(max_value=-1).map(str), WORDS),
}


@FUZZ
@given(flag=st.sampled_from(sorted(GENERATE_FLAGS)).flatmap(lambda f: GENERATE_FLAGS[f].map(lambda v: (f, v))))
def test_generate_refuses_bad_flags(flag, workdir, capsys):
    name, value = flag
    assert_refused(capsys, ["generate", "--model", workdir / "ckpt", "--prompt-ids", "1,2", f"{name}={value}"], name)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 4), t=st.floats(0, 2), p=st.floats(0.05, 1), k=st.integers(0, 50), r=st.floats(0.5, 2))
def test_generate_runs_in_range_flags(n, t, p, k, r, workdir, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(workdir / "ckpt"),
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            str(n),
            "--temperature",
            repr(t),
            "--top-p",
            repr(p),
            "--top-k",
            str(k),
            "--repetition-penalty",
            repr(r),
            "--seed",
            "0",
        ]
    )
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err, out.err[-500:]
    assert len([x for x in out.out.strip().split(",") if x]) == n


QUANT_FLAGS = {
    "--calib-samples": st.one_of(st.integers(max_value=0).map(str), WORDS),
    "--seq-len": st.one_of(st.integers(max_value=1).map(str), WORDS),
    "--damp": st.one_of(st.floats(-10, 0).map(str), st.just("nan"), WORDS),
    "--alpha": st.one_of(st.floats(1.001, 10).map(str), st.floats(-10, -0.001).map(str), WORDS),
    "--budget-bits": st.one_of(st.floats(-10, 0).map(str), st.floats(16.01, 1e6).map(str), WORDS),
    "--qat-steps": st.one_of(st.integers(max_value=0).map(str), WORDS),
    "--qat-lr": st.one_of(st.floats(-1, 0).map(str), WORDS),
    "--scheme": WORDS,
}
_counter = itertools.count()


@FUZZ
@given(flag=st.sampled_from(sorted(QUANT_FLAGS)).flatmap(lambda f: QUANT_FLAGS[f].map(lambda v: (f, v))))
def test_quantize_refuses_bad_flags(flag, workdir, capsys):
    name, value = flag
    out = workdir / f"q{next(_counter)}"
    assert_refused(capsys, ["quantize", "--model", workdir / "ckpt", "--out", out, f"{name}={value}"], name.lstrip("-"))
    assert not out.exists()


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["int8", "int4-g32", "nf4"]), seed=st.integers(0, 10))
def test_quantize_runs_in_range_flags(scheme, seed, workdir, capsys):
    code = main(
        [
            "quantize",
            "--model",
            str(workdir / "ckpt"),
            "--out",
            str(workdir / f"q{next(_counter)}"),
            "--scheme",
            scheme,
            "--seed",
            str(seed),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err[-500:]
