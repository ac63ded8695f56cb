"""One recipe-config loader (lmforge.config) used by every recipe, and one meaning per flag across
the commands (README's flag table)."""

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, command_parser
from lmforge.cli import main as cli
from lmforge.common import LmforgeError, checked
from lmforge.config import CONFIG_DIR, config_names, load_config, load_config_tree
from lmforge.recipes._common import make_run_dir

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lmforge"


def recipe_classes() -> dict[str, type]:
    """Built-in config name -> the dataclass its recipe loads it as."""
    from lmforge.data.config import DataConfig
    from lmforge.multimodal.config import ClipTrainConfig, VlmTrainConfig
    from lmforge.recipes.evaluate import EvalRecipe
    from lmforge.recipes.pretrain import PretrainRecipe
    from lmforge.recipes.sft import SFTRecipe
    from lmforge.train.align_config import AlignConfig

    return {
        "pretrain-tiny": PretrainRecipe,
        "sft-tiny": SFTRecipe,
        "align-default": AlignConfig,
        "eval-default": EvalRecipe,
        "eval-example": EvalRecipe,
        "clip-shapes": ClipTrainConfig,
        "clip-digits": ClipTrainConfig,
        "vlm-shapes": VlmTrainConfig,
        "data-default": DataConfig,
    }


# ----------------------------------------------------------------------------- every recipe, one loader


def test_every_builtin_config_loads_through_the_one_loader(tmp_path):
    classes = recipe_classes()
    pipelines = {n for n in config_names() if n.startswith("pipeline-")}  # the pipeline's open recipe (a mapping)
    assert set(config_names()) - pipelines == set(classes), "a new built-in config needs its recipe dataclass here"
    for name, cls in classes.items():
        cfg = load_config(cls, name)
        assert isinstance(cfg, cls)
        # a run's saved config.yaml (every field) loads back as the same config
        saved = tmp_path / f"{name}.yaml"
        make_run_dir(tmp_path, "run", cfg)
        (tmp_path / "run" / "config.yaml").rename(saved)
        assert load_config(cls, saved) == cfg
        # the file's values are the ones loaded, not the dataclass defaults
        tree = load_config_tree(name)
        for key, value in tree.items():
            if not isinstance(value, dict) and value is not None and not isinstance(value, list):
                assert getattr(cfg, key) == value or str(getattr(cfg, key)) == str(value), (name, key)
    for name in pipelines:
        assert isinstance(load_config_tree(name), dict)


def test_only_the_loader_reads_yaml():
    """No second loader: lmforge/config.py is the one module that parses YAML text."""
    readers = [
        str(path.relative_to(PKG))
        for path in PKG.rglob("*.py")
        if path != PKG / "config.py"
        and re.search(r"yaml\.(safe_|full_|unsafe_)?load(_all)?\(", path.read_text(encoding="utf-8"))
    ]
    assert not readers, f"YAML read outside lmforge/config.py: {readers}"


def test_recipes_with_a_config_flag_load_through_the_loader():
    for cmd in COMMANDS:
        parser = command_parser(cmd)
        if any("--config" in a.option_strings for p in _parsers(parser) for a in p._actions):
            module = COMMANDS[cmd][0].rsplit(".", 1)[-1]
            text = (PKG / "recipes" / f"{module}.py").read_text(encoding="utf-8")
            assert re.search(r"\bload_config(_tree)?\(", text), f"{cmd} reads --config without lmforge.config"


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["pretrain", "--set", "train.steps=abc"], "train.steps", "abc"),
        (["sft", "--set", "optim.lr=fast"], "optim.lr", "fast"),
        (["align", "--set", "dpo.beta=-1"], "dpo.beta", "-1"),
        (["eval", "MODEL", "--set", "builtin.num_examples=many"], "builtin.num_examples", "many"),
        (["clip", "train", "--out", "OUT", "--set", "steps=0"], "steps", "0"),
        (["vlm", "train", "--out", "OUT", "--set", "lr=zero"], "lr", "zero"),
        (
            ["data", "prepare", "--no-progress", "--out", "OUT", "--set", "dedup.threshold=high"],
            "dedup.threshold",
            "high",
        ),
        (["train-medusa", "--model", "MODEL", "--out", "OUT", "--steps", "0"], "steps", "must be >= 1"),
        (["pretrain", "--set", "train.stepz=3"], "stepz", "train.stepz"),
        (["pretrain", "--set", "train.steps.x=3"], "train.steps", "not a section"),
        (["align", "--set", "model.nope=1"], "nope", "model.nope"),
    ],
)
def test_a_bad_set_names_the_dotted_field_and_value(argv, field, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / "o") if a == "OUT" else str(tmp_path) if a == "MODEL" else a for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert field in err and value in err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()


def test_align_reads_typed_dataclasses():
    from lmforge.train.align_config import AlignConfig, AlignTrain

    cfg = load_config(AlignConfig, "align-default", ["train.lr=3e-4", "method=grpo"])
    assert isinstance(cfg.train, AlignTrain) and cfg.train.lr == 3e-4 and cfg.method == "grpo"
    # the recipe reads fields, never the raw mapping: no cfg["section"] subscripts are left
    tree = ast.parse((PKG / "recipes" / "align.py").read_text(encoding="utf-8"))
    raw = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Subscript)
        and isinstance(n.value, ast.Name)
        and n.value.id in ("cfg", "tc", "dc", "rc")
        and isinstance(n.slice, ast.Constant)
    ]
    assert not raw, f"recipes/align.py reads raw config dicts at lines {raw}"


# ----------------------------------------------------------------------------- the loader itself


@dataclasses.dataclass
class _Inner:
    n: int = checked(1, ge=1)


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    maybe: _Inner | None = None
    free: dict = dataclasses.field(default_factory=dict)
    name: str = "x"


def test_overrides_follow_the_schema(tmp_path):
    cfg = load_config(_Outer, None, ["inner.n=3", "free.any.depth=1", "maybe.n=2", "name=2024"])
    assert cfg == _Outer(_Inner(3), _Inner(2), {"any": {"depth": 1}}, "2024")
    with pytest.raises(LmforgeError, match=r"override 'inner.m': unknown field 'm' \(known here: n\)"):
        load_config(_Outer, None, ["inner.m=1"])
    with pytest.raises(LmforgeError, match="'name' is a value, not a section"):
        load_config(_Outer, None, ["name.x=1"])
    with pytest.raises(LmforgeError, match=r"inner.n=0: must be >= 1"):
        load_config(_Outer, None, ["inner.n=0"])
    with pytest.raises(LmforgeError, match="expected KEY=VALUE"):
        load_config(_Outer, None, ["inner.n"])
    with pytest.raises(LmforgeError, match="not valid YAML"):
        load_config(_Outer, None, ["free.x=[1"])
    # a file, then overrides, then flag values; `base`: a config whose top-level fields the file replaces
    (tmp_path / "a.yaml").write_text("inner: {n: 5}\nname: a\n")
    (tmp_path / "b.yaml").write_text("name: b\n")
    assert load_config(_Outer, tmp_path / "a.yaml", ["name=c"], values={"inner.n": 7}) == _Outer(_Inner(7), name="c")
    assert load_config(_Outer, tmp_path / "b.yaml", base=tmp_path / "a.yaml") == _Outer(_Inner(5), name="b")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(LmforgeError, match="bad.yaml: expected a mapping"):
        load_config(_Outer, tmp_path / "bad.yaml")
    with pytest.raises(LmforgeError, match="not found"):
        load_config(_Outer, "no-such-config")
    assert (CONFIG_DIR / "pretrain-tiny.yaml").is_file() and load_config_tree("pretrain-tiny.yaml")


# ----------------------------------------------------------------------------- one meaning per flag


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _parsers(sub)


def _visible_flags() -> dict[str, list[tuple[str, argparse.Action]]]:
    """--flag -> [(command, action)] over every command and sub-command, deprecated aliases left out."""
    out: dict[str, list] = {}

    def walk(name, parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(f"{name} {sub}", sp)
            elif a.option_strings and a.help is not argparse.SUPPRESS and a.dest != "help":
                for flag in a.option_strings:
                    if flag.startswith("--"):
                        out.setdefault(flag, []).append((name, a))

    for cmd in COMMANDS:
        walk(cmd, command_parser(cmd))
    return out


def _readme_table() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Flags and recipe configs", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(--[\w-]+)` \| .+? \| ([\w ,-]+) \|$", section, flags=re.MULTILINE)
    assert rows, "README: no flag table under '### Flags and recipe configs'"
    return {flag: [c.strip() for c in commands.split(",")] for flag, commands in rows}


def test_a_flag_has_one_dest_and_one_kind_in_every_command():
    bad = []
    for flag, uses in _visible_flags().items():
        dests = {a.dest.removeprefix("flag_") for _, a in uses}  # config flags store as flag_<name>
        kinds = {"switch" if a.nargs == 0 else "value" for _, a in uses}
        if len(dests) > 1 or len(kinds) > 1:
            bad.append(f"{flag}: {[(c, a.dest, a.nargs) for c, a in uses]}")
    assert not bad, "a flag with two meanings:\n" + "\n".join(bad)


def test_readme_flag_table_lists_every_shared_flag_with_its_commands():
    table, flags = _readme_table(), _visible_flags()
    shared = {flag: sorted(c for c, _ in uses) for flag, uses in flags.items() if len(uses) > 1}
    assert set(table) == set(shared), f"README table vs parsers: {set(table) ^ set(shared)}"
    for flag, commands in table.items():
        assert sorted(commands) == shared[flag], f"{flag}: README says {commands}, parsers say {shared[flag]}"


@pytest.mark.parametrize(
    "cmd, argv, dest, value",
    [
        ("pretrain", ["--model", "small"], "flag_preset", "small"),
        ("pretrain", ["--out", "runs2"], "flag_runs_dir", "runs2"),
        ("sft", ["--out", "runs2"], "flag_runs_dir", "runs2"),
        ("align", ["--out", "runs2"], "flag_runs_dir", "runs2"),
        ("generate", ["--model", "m", "--spec-k", "3"], "num_speculative", 3),
        ("pipeline", ["--recipe", "pipeline-micro"], "config", "pipeline-micro"),
        ("estimate", ["--model", "tiny", "--batch", "2"], "batch_size", 2),
        ("data", ["prepare", "--output", "d"], "out", "d"),
    ],
)
def test_old_spellings_are_hidden_aliases_with_a_warning(cmd, argv, dest, value, capsys):
    parser = command_parser(cmd)
    args = parser.parse_args(argv)
    assert getattr(args, dest) == value
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and "is deprecated; use" in warning
    old = argv[-2]
    hidden = [a.help is argparse.SUPPRESS for p in _parsers(parser) for a in p._actions if old in a.option_strings]
    assert hidden == [True]  # hidden from --help


def test_pipeline_calls_pretrain_and_sft_with_current_flags(tmp_path, monkeypatch, capsys):
    from lmforge.recipes import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "lmforge", lambda *args, log_file=None: calls.append([str(a) for a in args]))
    cfg = load_config_tree("pipeline-micro")
    pipeline.stage_pretrain(cfg, tmp_path, resume=True)
    pipeline.stage_draft(cfg, tmp_path, resume=True)
    pretrain = command_parser("pretrain")
    for argv in calls:
        assert argv[0] == "pretrain"
        args = pretrain.parse_args(argv[1:])
        assert args.flag_preset in (cfg["pretrain"]["preset"], (cfg.get("draft") or {}).get("preset"))
        assert args.flag_runs_dir == str(tmp_path)
    assert calls and "deprecated" not in capsys.readouterr().err
