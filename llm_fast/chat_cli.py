"""`llm-fast chat`: a multi-turn chat REPL on one KV cache (see llm_fast.chat.ChatSession).

Replies stream as they are generated. On a terminal the prompt is ">>> " with readline line
editing; with stdin piped, each input line is one user turn and stdout holds only the replies
(one line each; /stats and /help also print there), so a chat can be scripted. Notes and
warnings go to stderr.

Leave with exit, quit, bye, Ctrl-D (end of input) or Ctrl-C at the prompt; Ctrl-C while a reply
streams stops that reply (the session keeps the part shown). The conversation is loaded from
-i/--history-in and saved to -o/--history-out (--io FILE: both) as a JSON list of
{"role", "content"} on every one of those exits. A missing (with -i), empty or invalid history
file starts a new conversation with a one-line warning.
"""
from __future__ import annotations

import json
import os
import sys

from .cli import CLIError, _positive_int, add_model_args, add_sampling_args, load_from_args
from .cli import sampling_from_args

PROMPT = ">>> "
EXIT_WORDS = ("exit", "quit", "bye")
HELP = """\
/reset       forget the conversation (the system prompt stays)
/undo        remove your last message and its reply
/regenerate  replace the last reply with a new one
/stats       tokens/s, reused prompt tokens and memory of the last turn
/help        this list
exit, quit, bye or Ctrl-D leave (saving the history given with -o/--io);
Ctrl-C stops a reply, and at the prompt it leaves."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a model (multi-turn, streaming, history files)",
        description="Chat with a model: replies stream as they are generated, and the KV cache "
                    "is kept between turns (only new tokens are prefilled). Type /help in the "
                    "chat for its commands. With stdin piped, each line is one user turn.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", "-s", default=None, help="system prompt")
    p.add_argument("--chat-template", default=None, metavar="chatml|FILE",
                   help="chat format: 'chatml', or a Jinja file / tokenizer_config.json / model "
                        "folder to take it from (default: the model's own template)")
    p.add_argument("--max-context", type=_positive_int("--max-context"), default=None,
                   help="KV cache length in tokens (default: the model's context); older turns "
                        "are dropped from the prompt when a turn would not fit")
    p.add_argument("-i", "--history-in", metavar="FILE", default=None,
                   help="start from the conversation in FILE (JSON list of {role, content})")
    p.add_argument("-o", "--history-out", metavar="FILE", default=None,
                   help="save the conversation to FILE on exit")
    p.add_argument("--io", metavar="FILE", default=None, help="same as -i FILE -o FILE")
    p.set_defaults(func=cmd_chat)


# ---------------------------------------------------------------------------------------------
# History files


def read_history(path: str):
    """(messages, None) from a history file, or (None, why it cannot be used)."""
    from .chat import validate_history
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None, "does not exist"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot be read ({e})"
    if not text.strip():
        return None, "is empty"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON ({e})"
    try:
        return validate_history(data), None
    except ValueError as e:
        return None, f"is not a chat history ({e})"


def write_history(path: str, messages: list) -> None:
    """Write atomically: a crash while saving never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(messages, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _template_from_arg(spec, tokenizer):
    """--chat-template: None (the model's own), 'chatml', or a file/folder holding a template."""
    from .chat_template import ChatTemplate, load_chat_template
    if spec is None or spec == "chatml":
        return spec
    if not os.path.exists(spec):
        raise CLIError(f"--chat-template {spec!r} is neither 'chatml' nor an existing file")
    found = load_chat_template(spec)
    if found is None:
        raise CLIError(f"--chat-template {spec}: holds no chat template")
    tokens = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
              **found.template_vars}
    return ChatTemplate(found.source, origin=spec, **tokens)


# ---------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_stats(session) -> str:
    s = session.last_stats
    if s is None:
        first = "last turn: none yet"
    else:
        first = (f"last turn: {s.prompt_tokens} prompt tokens ({s.reused_tokens} reused from the "
                 f"cache, {s.computed_tokens} computed at {s.prompt_tps:.1f} tok/s); "
                 f"{s.generated_tokens} generated at {s.decode_tps:.1f} tok/s; "
                 f"finish: {s.finish_reason}")
    mem = session.memory_bytes()
    n = len(session.messages)
    second = (f"session: {n} message{'s' * (n != 1)} ({session.dropped_messages} dropped by the "
              f"context window); KV cache {session.cache.length} of {session.context_length} "
              f"tokens, {_size(mem.used)} in use, {_size(mem.reserved)} reserved")
    return first + "\n" + second


class ChatREPL:
    """The read-reply loop over one ChatSession; run() returns on every normal exit."""

    def __init__(self, session, stdin=None, stdout=None, stderr=None, interactive=None):
        self.session = session
        self.stdin = stdin if stdin is not None else sys.stdin
        self.out = stdout if stdout is not None else sys.stdout
        self.err = stderr if stderr is not None else sys.stderr
        self.interactive = self.stdin.isatty() if interactive is None else interactive

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def read_line(self):
        """The next input line, or None at the end of input."""
        if self.interactive:
            try:
                return input(PROMPT)
            except EOFError:
                self.out.write("\n")
                return None
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    def run(self) -> None:
        while True:
            try:
                line = self.read_line()
            except KeyboardInterrupt:       # Ctrl-C at the prompt: leave
                self.out.write("\n")
                return
            if line is None:
                return
            text = line.strip()
            if not text:
                continue
            if text.lower() in EXIT_WORDS:
                return
            if text.startswith("/"):
                self.command(text)
            else:
                self.stream(lambda: self.session.send(text))

    def stream(self, start) -> None:
        """Print one reply as it is generated."""
        from .chat_template import ChatTemplateError
        reply = None
        try:
            reply = start()
            for piece in reply:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:           # Ctrl-C during a reply: stop it, keep the program
            if reply is not None:
                reply.close()
            self.out.write("\n")
            self.out.flush()
            self.note("[reply stopped]")
            return
        except (ValueError, ChatTemplateError) as e:   # does not fit / the template refused
            self.out.write("\n" if reply is not None and reply.text else "")
            self.note(f"error: {e}")
            return
        self.out.write("\n")
        self.out.flush()

    def command(self, text: str) -> None:
        name = text.split()[0].lower()
        s = self.session
        if name == "/help":
            self.out.write(HELP + "\n")
        elif name == "/reset":
            s.reset()
            self.note("[conversation cleared]")
        elif name == "/undo":
            try:
                removed = s.undo()
            except ValueError as e:
                self.note(str(e))
                return
            said = removed[0]["content"]
            self.note(f"[removed: {said[:60]!r}{'...' if len(said) > 60 else ''} and its reply]")
        elif name == "/regenerate":
            if not s.messages or s.messages[-1]["role"] != "assistant":
                self.note("nothing to regenerate: the conversation has no reply yet")
                return
            self.stream(s.regenerate)
        elif name == "/stats":
            self.out.write(format_stats(s) + "\n")
        else:
            self.note(f"unknown command {name}; /help lists the commands")
        self.out.flush()


def cmd_chat(args) -> int:
    from .chat import ChatSession
    from .chat_template import NoChatTemplateError
    if args.io is not None and (args.history_in is not None or args.history_out is not None):
        raise CLIError("--io FILE already means -i FILE -o FILE; use either --io or -i/-o")
    history_in = args.io if args.io is not None else args.history_in
    history_out = args.io if args.io is not None else args.history_out
    sampling = sampling_from_args(args)
    model, tokenizer = load_from_args(args)
    template = _template_from_arg(args.chat_template, tokenizer)
    try:
        session = ChatSession(model, tokenizer, system_prompt=args.system, template=template,
                              sampling=sampling, max_new_tokens=args.max_new_tokens,
                              stop=args.stop, max_context=args.max_context)
    except NoChatTemplateError:
        raise CLIError("this model ships no chat template; choose one with --chat-template "
                       "chatml or --chat-template FILE") from None
    if args.max_new_tokens >= session.context_length:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in "
                       f"the context of {session.context_length} tokens")

    repl = ChatREPL(session)
    if history_in is not None:
        messages, problem = read_history(history_in)
        if messages is not None:
            session.load_history(messages)
            if args.system is not None:     # an explicit --system wins over the file's
                session.system_prompt = args.system
            if repl.interactive:
                repl.note(f"[{len(messages)} messages loaded from {history_in}]")
        elif not (problem == "does not exist" and args.io is not None):
            repl.note(f"llm-fast chat: warning: history file {history_in} {problem}; "
                      f"starting a new conversation")
    if repl.interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        repl.note(f"llm-fast chat ({session.template.origin}, context {session.context_length} "
                  f"tokens). /help for commands; exit, quit, bye or Ctrl-D to leave.")
    try:
        repl.run()
    finally:
        if history_out is not None:
            write_history(history_out, session.history)
    return 0
