"""Generate text from a model: an lmforge checkpoint or a Hugging Face folder (GPT-2, Llama, Qwen2,
Mistral, Mixtral). Greedy by default; sampling with --temperature/--top-k/--top-p; --stream prints
tokens as they come; --chat wraps the prompt in the model's own chat template."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lmforge.common import LmforgeError, get_device, seed_everything
from lmforge.recipes._common import add_deprecated_alias, bounded


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (lmforge checkpoint or Hugging Face folder)")
    p.add_argument("--prompt", help="prompt text (encoded with the model's tokenizer)")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids (for folders without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument(
        "--max-new-tokens",
        type=bounded(int, ge=0),
        default=128,
        help="at most the model's context (max_position_embeddings) minus the prompt",
    )
    p.add_argument("--temperature", type=bounded(float, ge=0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=bounded(int, ge=0), default=0)
    p.add_argument("--top-p", type=bounded(float, gt=0, le=1), default=1.0)
    p.add_argument("--repetition-penalty", type=bounded(float, gt=0), default=1.0)
    p.add_argument("--min-p", type=bounded(float, ge=0, le=1), default=0.0, help="drop tokens under P x the top one's")
    p.add_argument("--presence-penalty", type=bounded(float, ge=-2, le=2), default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=bounded(float, ge=-2, le=2), default=0.0, help="OpenAI's, in [-2, 2]")
    structured = p.add_mutually_exclusive_group()  # the output must match (generation stops when it is complete)
    structured.add_argument(
        "--json-mode", action="store_true", help="JSON mode: the output is a JSON object (OpenAI's json_object)"
    )
    structured.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under this JSON Schema")
    structured.add_argument("--regex", metavar="PATTERN", help="the whole output matches this regular expression")
    structured.add_argument(
        "--grammar",
        metavar="FILE",
        help="the output matches this grammar: llguidance's Lark-like EBNF (start rule `start`; "
        "a llama.cpp GBNF file with `root ::= ...` is converted)",
    )
    p.add_argument("--seed", type=bounded(int, ge=0), default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    p.add_argument("--image", help="image file for a vision-language model folder (lmforge vlm train)")
    p.add_argument(
        "--audio",
        help="audio file (wav/flac/ogg/mp3) for an audio-language model folder (lmforge audio train); "
        "--prompt defaults to the model's transcription prompt",
    )
    p.add_argument("--draft", metavar="DIR", help="speculative decoding with this smaller draft model (same tokenizer)")
    p.add_argument("--lookup", action="store_true", help="speculative decoding with prompt-lookup (n-gram) drafts")
    p.add_argument("--medusa", metavar="DIR", help="speculative decoding with Medusa heads (lmforge train-medusa)")
    p.add_argument(
        "--num-speculative", type=bounded(int, ge=1), default=4, help="tokens drafted per step for --draft/--lookup"
    )
    add_deprecated_alias(p, "--spec-k", "--num-speculative")  # the name `serve` uses
    p.add_argument(
        "--draft-min-confidence",
        type=bounded(float, ge=0, le=1),
        default=0.0,
        metavar="P",
        help="--draft with one prompt: stop drafting when the draft's probability of its next token "
        "is below P (then --num-speculative is an upper bound; e.g. --num-speculative 6 "
        "--draft-min-confidence 0.4)",
    )
    p.add_argument(
        "--tp",
        type=bounded(int, ge=1),
        default=1,
        help="tensor-parallel degree: shard the model over N processes (torchrun --nproc_per_node N)",
    )
    p.add_argument("--prompts", metavar="FILE.jsonl", help="batch mode: every prompt of the file through the engine")
    p.add_argument("--out", metavar="FILE.jsonl", help="where --prompts writes the completions")


def main(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.infer.decode import decode_ids
    from lmforge.infer.generate import compiled_decode, stream_text
    from lmforge.infer.prepare import prepare_for_inference

    if args.prompt is None and args.prompt_ids is None and args.prompts is None and not args.audio:
        raise LmforgeError("give --prompt TEXT (or --prompt-ids 1,2,3, or --prompts FILE.jsonl --out FILE.jsonl)")
    device = get_device(args.device)
    if args.image and args.audio:
        raise LmforgeError("give --image (a VLM) or --audio (an audio-language model), not both")
    if (args.image or args.audio) and args.tp > 1:
        raise LmforgeError(f"{'--image' if args.image else '--audio'} cannot be combined with --tp yet")
    if args.image or args.audio:  # a multimodal model: the features are spliced in at <image> / <audio>
        return answer_media(args, device)
    model = load_model(args.model, device=device, dtype=args.dtype)
    if args.tp > 1:
        model = tensor_parallel_model(model, args, device)
    else:
        # Eager decode: pre-transposed weights; compiled decode: inductor's freezing prepacks nn.Linear itself.
        model = model.requires_grad_(False) if args.compile else prepare_for_inference(model)
    tokenizer = load_tokenizer_if_any(args.model)
    if args.seed is not None:
        seed_everything(args.seed)
    params = sampling_params(args)
    check_context(model.config, 0, args.max_new_tokens)  # fail before any prompt is read or cache allocated
    decode_fn = compiled_decode(model) if args.compile else None
    if args.prompts:  # batch mode: all prompts through the continuous-batching engine
        from lmforge.infer.batch import run_prompts_file

        if not args.out:
            raise LmforgeError("--prompts needs --out FILE.jsonl")
        if args.medusa:
            raise LmforgeError("--prompts runs through the engine, which drafts with --draft DIR or --lookup")
        summary = run_prompts_file(
            model,
            tokenizer,
            args.prompts,
            args.out,
            params,
            draft=args.draft,
            lookup=args.lookup,
            num_speculative=args.num_speculative,
        )
        print(json.dumps(summary), file=sys.stderr)
        return 0
    ids, prompt = None, args.prompt
    if args.prompt_ids is not None or tokenizer is None:
        if args.prompt_ids is None:
            raise LmforgeError(f"{args.model} has no tokenizer.json: pass --prompt-ids instead of --prompt")
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise LmforgeError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
        if bad:
            raise LmforgeError(
                f"--prompt-ids: token id {bad[0]} is outside the vocabulary (size {model.config.vocab_size})"
            )
    elif args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        from lmforge.tokenizer.text import end_of_turn_ids  # the template's end of turn (<|eot_id|>, ...)

        params.stop_token_ids += [t for t in end_of_turn_ids(tokenizer) if t not in params.stop_token_ids]
    n_prompt = len(ids) if ids is not None else len(tokenizer.encode(prompt))
    check_context(model.config, n_prompt, args.max_new_tokens)
    spec: dict = {}
    if args.draft or args.lookup or args.medusa:  # speculative decoding: the same driver, with a proposer
        from lmforge.infer.batch import make_proposer
        from lmforge.infer.speculative import SpecStats

        proposer, k = make_proposer(
            model,
            n_prompt + args.max_new_tokens,
            draft=args.draft,
            lookup=args.lookup,
            medusa=args.medusa,
            k=args.num_speculative,
            min_confidence=args.draft_min_confidence,
            tokenizer=tokenizer,
        )
        spec = {"proposer": proposer, "k": k, "stats": SpecStats()}
    if ids is not None:  # ids out (EOS stops only a speculative run, as before)
        stops = spec or params.grammar is not None  # a complete grammar ends on EOS
        eos = [tokenizer.eos_id] if stops and tokenizer is not None and tokenizer.eos_id is not None else []
        out = decode_ids(model, params, ids, decode_fn=decode_fn, eos_token_ids=eos, tokenizer=tokenizer, **spec)[0]
        print(",".join(str(t) for t in out))
    else:
        print_text(stream_text(model, tokenizer, prompt, params, decode_fn, **spec), tokenizer, args.stream)
    if spec:
        print(json.dumps(spec["stats"].as_dict()), file=sys.stderr)
    return 0


def tensor_parallel_model(model, args: argparse.Namespace, device):
    """Shard `model` over torchrun's ranks (lmforge.parallel). Every rank decodes the same tokens from
    the same gathered logits; only rank 0 prints."""
    from lmforge.common import dist_info
    from lmforge.parallel import apply_tensor_parallel, shared_seed

    unsupported = {"--compile": args.compile, "--draft": args.draft, "--lookup": args.lookup}
    unsupported.update({"--medusa": args.medusa, "--prompts": args.prompts})
    for flag, value in unsupported.items():
        if value:
            raise LmforgeError(f"{flag} cannot be combined with --tp yet")
    model = apply_tensor_parallel(model.requires_grad_(False), args.tp, device)
    args.seed = shared_seed(args.seed)
    if dist_info().rank != 0:  # the other ranks compute the same text: one copy of the output
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    return model


def grammar_spec(args: argparse.Namespace):
    """The GrammarSpec of --json-mode / --json-schema / --regex / --grammar (None without one), checked
    here so a bad schema or grammar is an error naming its flag and file."""
    from pathlib import Path

    from lmforge.infer.grammar import GrammarSpec, check_grammar

    options = (("--json-mode", "json", "json_mode"), ("--json-schema", "json_schema", "json_schema"))
    options += (("--regex", "regex", "regex"), ("--grammar", "ebnf", "grammar"))
    chosen = [(flag, kind, getattr(args, attr)) for flag, kind, attr in options if getattr(args, attr)]
    if not chosen:
        return None
    flag, kind, value = chosen[0]  # argparse keeps them mutually exclusive
    source = ""
    if kind == "regex":
        source = value
    elif kind != "json":
        try:
            source = Path(value).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise LmforgeError(f"{flag} {value}: cannot read the file ({e})") from None
    try:
        spec = GrammarSpec(kind, source)
        check_grammar(spec)
    except LmforgeError as e:
        raise LmforgeError(f"{flag} {value}: {e}" if kind != "json" else f"{flag}: {e}") from None
    return spec


def sampling_params(args: argparse.Namespace):
    from lmforge.infer.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=list(args.stop),
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        grammar=grammar_spec(args),
    )


def print_text(pieces, tokenizer, stream: bool) -> None:
    """Print generated text (as it comes with --stream), then a token count and time on stderr."""
    start, out = time.perf_counter(), []
    for piece in pieces:
        out.append(piece)
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    print("" if stream else "".join(out))
    n_tokens = len(tokenizer.encode("".join(out)))
    print(f"[~{n_tokens} tokens in {time.perf_counter() - start:.2f}s]", file=sys.stderr)


def answer_media(args: argparse.Namespace, device) -> int:
    """--image / --audio: one image or clip + one prompt to a VLM / ALM folder (`lmforge vlm|audio
    train`), in its chat format. The same sampling flags, stop strings and --stream as text, through
    the same decode driver."""
    from lmforge.checkpoint import load_tokenizer_if_any
    from lmforge.infer.generate import compiled_decode, stream_text
    from lmforge.tokenizer.text import end_of_turn_ids

    flag = "--image" if args.image else "--audio"
    for other, on in (
        ("--draft", args.draft),
        ("--lookup", args.lookup),
        ("--medusa", args.medusa),
        ("--prompts", args.prompts),
        ("--prompt-ids", args.prompt_ids),
    ):
        if on:
            raise LmforgeError(f"{flag} decodes one chat prompt with the multimodal model; it does not take {other}")
    tokenizer = load_tokenizer_if_any(args.model)
    if tokenizer is None:
        raise LmforgeError(f"{args.model} has no tokenizer.json: {flag} needs the model's tokenizer")
    model, ids, embeds = (_image_inputs if args.image else _audio_inputs)(args, tokenizer, device)
    if args.seed is not None:
        seed_everything(args.seed)
    params = sampling_params(args)
    params.stop_token_ids += [t for t in end_of_turn_ids(tokenizer) if t not in params.stop_token_ids]
    check_context(model.config, len(ids), args.max_new_tokens)
    decode_fn = compiled_decode(model.language_model) if args.compile else None
    print_text(stream_text(model, tokenizer, ids, params, decode_fn, inputs_embeds=embeds), tokenizer, args.stream)
    return 0


def _image_inputs(args: argparse.Namespace, tokenizer, device):
    from lmforge.common import get_dtype
    from lmforge.multimodal import image_question, load_multimodal, prepare_chat

    vlm = load_multimodal(args.model, device, kind="vlm").to(get_dtype(args.dtype, device)).requires_grad_(False)
    inputs = prepare_chat(vlm, tokenizer, image_question(args.image, args.prompt or "describe the image.", args.system))
    return vlm, inputs["input_ids"][0].tolist(), inputs["inputs_embeds"]


def _audio_inputs(args: argparse.Namespace, tokenizer, device):
    import torch

    from lmforge.common import get_dtype
    from lmforge.multimodal import load_multimodal
    from lmforge.multimodal.alm import render_audio
    from lmforge.multimodal.audio import load_audio

    if args.system:
        raise LmforgeError("--audio uses the model's own prompt layout; it does not take --system")
    alm = load_multimodal(args.model, device, kind="alm").to(get_dtype(args.dtype, device)).requires_grad_(False)
    c = alm.alm_config
    wave = load_audio(args.audio, max_seconds=c.clip_seconds)
    ids, _ = render_audio(tokenizer, c, args.prompt or c.prompt)
    with torch.no_grad():
        embeds = alm.embed(torch.tensor([ids], device=device), alm.mel([wave]).to(device))
    return alm, ids, embeds


def check_context(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (max_position_embeddings): the KV cache
    is allocated for prompt + new tokens up front, so an unbounded --max-new-tokens would try to
    allocate it whole (1e9 tokens: ~128 GB for the tiny model) before producing anything."""
    limit = config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        room = max(0, limit - prompt_tokens)
        prompt = f"the prompt ({prompt_tokens} tokens) + " if prompt_tokens else ""
        raise LmforgeError(
            f"--max-new-tokens {max_new_tokens}: {prompt}{max_new_tokens} new tokens exceed the "
            f"model's context of {limit} positions (max_position_embeddings); use "
            f"--max-new-tokens {room} or less"
        )
