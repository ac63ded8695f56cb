"""L7: `lmforge <command>`. Thin: each command is a recipe module with `add_arguments(parser)` and
`main(args)`, imported only when that command runs so `lmforge --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# command -> (recipe module, one-line help). Add a line per command; keep it sorted by lifecycle.
COMMANDS: dict[str, tuple[str, str]] = {
    "pipeline": ("lmforge.recipes.pipeline", "the whole lifecycle, data to report, in one command"),
    "data": ("lmforge.recipes.data", "prepare training data, or check eval sets for overlap"),
    "pretrain": ("lmforge.recipes.pretrain", "pretrain a model (causal LM, masked LM, span corruption)"),
    "sft": ("lmforge.recipes.sft", "supervised fine-tuning, full or PEFT (LoRA, QLoRA...)"),
    "align": ("lmforge.recipes.align", "post-training: DPO, reward model, GRPO, PPO, distillation"),
    "estimate": ("lmforge.recipes.estimate", "memory needed to run or train a model, without running it"),
    "plot": ("lmforge.recipes.plot", "plot a training run's loss curves to PNG"),
    "quantize": ("lmforge.recipes.quantize", "quantize a model: RTN, GPTQ, AWQ, SmoothQuant, NF4, QAT"),
    "generate": ("lmforge.recipes.generate", "generate text from a model (HF folder or lmforge checkpoint)"),
    "train-medusa": ("lmforge.recipes.train_medusa", "train Medusa decoding heads on a frozen model"),
    "convert": ("lmforge.recipes.convert", "convert between Hugging Face folders and lmforge checkpoints"),
    "serve": ("lmforge.recipes.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "eval": ("lmforge.recipes.evaluate", "evaluate a model or endpoint, or --compare two runs"),
    "rag": ("lmforge.recipes.rag", "retrieval-augmented answers: index, search, ask with citations"),
    "agent": ("lmforge.recipes.agent", "tool-using agents: run a task with tools, evaluate, train tool use"),
    "arena": ("lmforge.recipes.arena", "rate models by pairwise battles: Bradley-Terry, Elo, win rates"),
    "safety": ("lmforge.recipes.safety", "probe safety, bias and robustness: red teaming, over-refusal, bias"),
    "route": ("lmforge.recipes.route", "train the learned router of edge-cloud routing (serve --fallback)"),
    "mtbench": ("lmforge.recipes.mtbench", "multi-turn judging (MT-Bench style): a judge grades whole conversations"),
    "clip": ("lmforge.recipes.clip", "train or evaluate a CLIP image-text model"),
    "vlm": ("lmforge.recipes.vlm", "train or evaluate a LLaVA-style vision-language model"),
    "audio": ("lmforge.recipes.audio", "train or evaluate an audio-language model (speech recognition)"),
    "video": ("lmforge.recipes.video", "train or evaluate video question answering (the VLM over frames)"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: data, tokenizer, pretraining, fine-tuning, quantization, inference, "
        "serving and evaluation of language models in one PyTorch package.",
        epilog="Start with `lmforge pipeline` (the whole lifecycle on the built-in corpus), then serve its model "
        "with `lmforge serve runs/pipeline-tiny/final`. Run `lmforge <command> --help` for the options of a command; "
        "`lmforge --debug <command> ...` (or LMFORGE_DEBUG=1) shows the traceback of an unexpected error.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=20),
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str, recipe=None) -> argparse.ArgumentParser:
    """The parser of `lmforge <name>` (the recipe module is imported unless given). Flags follow one
    convention across commands: a flag name means the same thing everywhere (README, "Flags")."""
    module_name, help_text = COMMANDS[name]
    recipe = recipe or importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"lmforge {name}",
        description=(recipe.__doc__ or help_text).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recipe.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `lmforge <command> ...`; returns the exit status: 0 done, 2 bad input (a one-line error
    naming the file, field or value), 1 an unexpected failure (one line; `--debug` or
    LMFORGE_DEBUG=1 shows the traceback), 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("LMFORGE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"lmforge: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name = COMMANDS[name][0]
    from lmforge.common import LmforgeError, apply_threads_policy

    try:
        apply_threads_policy()  # before the recipe imports torch: OpenMP reads its settings once, at load
        recipe = importlib.import_module(module_name)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lmforge"):
            print(
                f"lmforge: error: command {name!r} is not available in this build ({e.name} missing)", file=sys.stderr
            )
            return 2
        raise
    parser = command_parser(name, recipe)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # --help (0) or a bad flag (2, argparse printed why): a status, not an exit
        return e.code if isinstance(e.code, int) else 2
    try:
        result = recipe.main(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or the environment (disk full, out of memory): one line, not a traceback
        if debug:
            traceback.print_exc()
        what = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500] if str(e) else type(e).__name__
        print(
            f"lmforge {name}: unexpected error: {what}"
            + ("" if debug else " (run with LMFORGE_DEBUG=1 or `lmforge --debug ...` for the traceback)"),
            file=sys.stderr,
        )
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
