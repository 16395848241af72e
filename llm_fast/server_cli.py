"""`llm-fast serve`: the OpenAI-compatible server (llm_fast/server.py) on uvicorn.

Binds 127.0.0.1 by default: expose it on other interfaces deliberately (--host 0.0.0.0), and
then with --api-key.
"""
from __future__ import annotations

import os
import sys

from .cli import CLIError, _positive_int, add_model_args, load_from_args

SERVER_EXTRA = "install the server extra: pip install 'llm_fast[server]'"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API "
                                            "with a web chat page")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_positive_int("--port"), default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLM_FAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* "
                        "(default: $LLM_FAST_API_KEY; none: open)")
    p.add_argument("--chat-template", default=None, metavar="chatml|FILE",
                   help="chat template: 'chatml', or a Jinja file / tokenizer_config.json "
                        "(default: the model's own)")
    p.add_argument("--model-id", default=None,
                   help="the model name reported by /v1/models (default: from the path)")
    p.add_argument("--max-concurrent", type=_positive_int("--max-concurrent"), default=4,
                   help="requests decoding at once, interleaved (default: 4)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="further requests that may wait; beyond that, 429 (default: 16)")
    p.add_argument("--ctx-size", type=_positive_int("--ctx-size"), default=None,
                   help="context length per request (default: the model's)")
    p.add_argument("--prefix-cache", type=int, default=4,
                   help="finished KV caches kept for prompt-prefix reuse (default: 4; 0: off)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def _model_id(args) -> str:
    from .loader import DEFAULT_MODEL_FILE
    if args.model_id:
        return args.model_id
    if args.model is None:
        return DEFAULT_MODEL_FILE.split(".")[0]
    name = os.path.basename(os.path.normpath(args.model))
    return name[:-5] if name.endswith(".gguf") else name


def cmd_serve(args) -> int:
    try:
        import uvicorn
        from . import server
    except ImportError as e:
        raise CLIError(f"{SERVER_EXTRA} ({e})") from None
    from .chat_template import NoChatTemplateError, resolve_chat_template
    from .loader import resolve_model_path

    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_queue < 0:
        raise CLIError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.prefix_cache < 0:
        raise CLIError(f"--prefix-cache must be >= 0, got {args.prefix_cache}")
    model, tokenizer = load_from_args(args)
    try:
        template = resolve_chat_template(resolve_model_path(args.model), args.chat_template)
    except NoChatTemplateError:
        template = None
        print("llm-fast: note: the model ships no chat template, so /v1/chat/completions will "
              "answer 400; pass --chat-template chatml (or a Jinja file) to chat with it",
              file=sys.stderr)
    if args.ctx_size and args.ctx_size > model.config.max_position_embeddings:
        raise CLIError(f"--ctx-size {args.ctx_size} exceeds the model's context of "
                       f"{model.config.max_position_embeddings}")
    app = server.create_app(model, tokenizer, _model_id(args), api_key=args.api_key or None,
                            max_queue=args.max_queue, chat_template=template,
                            max_concurrent=args.max_concurrent,
                            prefix_cache_size=args.prefix_cache, n_ctx=args.ctx_size)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"llm-fast: serving {_model_id(args)} at http://{host}:{args.port}/ "
          f"(OpenAI API at /v1{', API key required' if args.api_key else ''})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
