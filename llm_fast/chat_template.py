"""Chat templates: a conversation -> the prompt string, rendered exactly as transformers'
`tokenizer.apply_chat_template(messages, tokenize=False)` renders it.

A model's template is a Jinja program shipped with its tokenizer (`chat_template` in
tokenizer_config.json, or a chat_template.jinja file, or `tokenizer.chat_template` in a GGUF).
Templates come from the Hub, so they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment with the same settings and helpers as transformers
(utils/chat_template_utils.py): trim_blocks, lstrip_blocks, the loopcontrols extension,
`raise_exception`, `strftime_now`, a `tojson` filter that does not escape HTML or non-ASCII,
restricted `dict` and `namespace`, and the `{% generation %}` tag (rendered as its body).

A model without a template never gets one silently: `resolve_chat_template` raises
NoChatTemplateError unless the caller asks for ChatML (`ChatTemplate.chatml()`) or passes a file.

The rendered prompt already contains whatever BOS the template writes, so encode it with
`add_special_tokens=False` (otherwise the prompt starts with two BOS tokens).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from .errors import LLMFastError, ModelNotFoundError

# The course's chat model template (ChatML), verbatim. Used only when a caller asks for it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The named special tokens transformers passes to every template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)

# Names a message's reasoning may come under; transformers copies it to the first two.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes


class ChatTemplateError(LLMFastError, ValueError):
    """A chat template, its inputs or its files are unusable."""


class TemplateError(ChatTemplateError):
    """The template refused the conversation (its `raise_exception(...)`), or failed to compile
    or render."""


class TemplateSecurityError(TemplateError):
    """The template tried something the sandbox forbids (private attributes, mutating methods)."""


class InvalidMessagesError(ChatTemplateError):
    """`messages` is not a non-empty list of {'role': str, 'content': str | [parts]} dicts."""


class NoChatTemplateError(ChatTemplateError):
    """The model ships no chat template and the caller did not choose one."""


# ---------------------------------------------------------------------------------------------
# The Jinja environment (same configuration as transformers' _cached_compile_jinja_template)


def _raise_exception(message):
    raise TemplateError(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the plain JSON text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` inside templates: builds dicts, exposes nothing else of the dict type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; a prompt needs only the body. Parsed into the same CallBlock as transformers'
    AssistantTracker, so variable scoping inside the block is identical."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _version_tuple(version: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


@lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    if _version_tuple(jinja2.__version__) < _MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes); "
            f"found {jinja2.__version__}: pip install -U jinja2")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    """Compile once per distinct template text."""
    return _environment().from_string(source)


# ---------------------------------------------------------------------------------------------
# Inputs: validation and the plain-data copy the template sees


def _check_messages(messages) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidMessagesError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}")
    if len(messages) == 0:
        raise InvalidMessagesError("messages is empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidMessagesError(
                f"messages[{i}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}")
        if "role" not in message:
            raise InvalidMessagesError(f"messages[{i}] has no 'role'")
        role = message["role"]
        if not isinstance(role, str) or not role:
            raise InvalidMessagesError(
                f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        content = message.get("content")
        if content is None:
            # OpenAI-style tool-call turns carry content None; every other turn needs content.
            if message.get("tool_calls"):
                continue
            what = "is None" if "content" in message else "is missing"
            raise InvalidMessagesError(f"messages[{i}]['content'] {what} (role {role!r})")
        if isinstance(content, str):
            continue
        if isinstance(content, (list, tuple)):
            _check_content_parts(i, content)
            continue
        raise InvalidMessagesError(
            f"messages[{i}]['content'] must be a string or a list of content parts, "
            f"got {type(content).__name__}")


def _check_content_parts(i: int, parts) -> None:
    for j, part in enumerate(parts):
        where = f"messages[{i}]['content'][{j}]"
        if not isinstance(part, Mapping):
            raise InvalidMessagesError(
                f"{where} must be a content part dict like {{'type': 'text', 'text': ...}}, "
                f"got {type(part).__name__}")
        if "type" in part and not isinstance(part["type"], str):
            raise InvalidMessagesError(f"{where}['type'] must be a string, got {part['type']!r}")
        if part.get("type") == "text" and not isinstance(part.get("text"), str):
            raise InvalidMessagesError(
                f"{where} is a text part, so its 'text' must be a string, "
                f"got {type(part.get('text')).__name__}")


def _plain(value: Any) -> Any:
    """Rebuild everything the template sees from plain JSON types (transformers'
    _plain_template_data): rich objects carry methods the sandbox does not know are unsafe, so
    anything else becomes an inert placeholder such as "<ndarray>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) are stripped back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    np = sys.modules.get("numpy")  # a numpy value implies numpy is already imported
    if np is not None and isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list) -> list:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _check_tools(tools) -> Optional[list]:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(
            f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for k, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(
                f"tools[{k}] must be a JSON-schema dict like "
                f"{{'type': 'function', 'function': {{...}}}}, got {type(tool).__name__}")
    return list(tools)


def _token_string(value, key: str, origin: str) -> Optional[str]:
    """A special token as written in tokenizer_config.json: a string, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ChatTemplateError(
        f"{origin}: {key} must be a string or a dict with a 'content' string, got {value!r}")


# ---------------------------------------------------------------------------------------------


class ChatTemplate:
    """A compiled chat template and the special-token strings it may reference.

    `ChatTemplate(source, bos_token="<s>", eos_token="</s>")`; extra keyword arguments are more
    template variables available on every render (e.g. `pad_token`). Tokens left as None are not
    defined in the template (as in transformers), so `{{ bos_token }}` then renders as ''.
    """

    def __init__(self, source: str, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, *, origin: str = "chat template",
                 **template_vars):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{origin}: the template must be a non-empty string")
        self.source = source
        self.origin = origin
        tokens = {"bos_token": bos_token, "eos_token": eos_token, **template_vars}
        self.template_vars = {
            k: (_token_string(v, k, origin) if k in SPECIAL_TOKEN_NAMES else v)
            for k, v in tokens.items() if v is not None}
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"{origin} does not compile: line {e.lineno}: {e.message}") from e

    @classmethod
    def chatml(cls, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
               **template_vars) -> "ChatTemplate":
        """The course's ChatML template, for models that ship none (chosen explicitly)."""
        return cls(CHATML_TEMPLATE, bos_token, eos_token, origin="ChatML template",
                   **template_vars)

    @property
    def bos_token(self) -> Optional[str]:
        return self.template_vars.get("bos_token")

    @property
    def eos_token(self) -> Optional[str]:
        return self.template_vars.get("eos_token")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Optional[Sequence[Mapping[str, Any]]] = None,
               documents: Optional[Sequence[Mapping[str, Any]]] = None, **extra) -> str:
        """The prompt text for `messages`. `add_generation_prompt` appends the header that opens
        the assistant's reply; `tools` are JSON-schema dicts; `extra` are further template
        variables (e.g. `date_string`, `enable_thinking`) and override the special tokens."""
        _check_messages(messages)
        tools = _check_tools(tools)
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ChatTemplateError("documents must be a list of dicts with 'title' and 'text'")
        # As apply_chat_template: drop None-valued keys (templates handle a missing key, but many
        # render None as "None"), then give the template a plain copy.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        chat = _alias_reasoning_fields(_plain(chat))
        variables = _plain({**self.template_vars, **extra})
        try:
            return self._template.render(
                messages=chat, tools=_plain(tools), documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TemplateSecurityError(f"{self.origin} tried an unsafe operation: {e}") from e
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"{self.origin} failed to render: {e}") from e

    def __repr__(self) -> str:
        tokens = ", ".join(f"{k}={v!r}" for k, v in self.template_vars.items()
                           if k in SPECIAL_TOKEN_NAMES)
        return f"ChatTemplate({self.origin!r}, {len(self.source)} chars, {tokens})"


# ---------------------------------------------------------------------------------------------
# Loading from model files


def _read_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_text(path: str) -> str:
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def _tokens_from_config(config: Mapping, origin: str) -> dict:
    return {k: _token_string(config.get(k), k, origin)
            for k in SPECIAL_TOKEN_NAMES if config.get(k) is not None}


def _select_template(value, name: str, origin: str) -> Optional[str]:
    """`chat_template` is a string, or a list of {"name", "template"} (several named templates)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for k, entry in enumerate(value):
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ChatTemplateError(
                    f"{origin}: chat_template[{k}] must be {{'name': str, 'template': str}}")
            named[entry["name"]] = entry["template"]
        if name not in named:
            raise ChatTemplateError(
                f"{origin} has several chat templates {sorted(named)} and none named {name!r}")
        return named[name]
    raise ChatTemplateError(
        f"{origin}: chat_template must be a string or a list of named templates, "
        f"got {type(value).__name__}")


def _dir_config(path: str):
    """(tokenizer_config.json contents or {}, its path, the special tokens of the directory)."""
    config_path = os.path.join(path, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    tokens = {}
    legacy_path = os.path.join(path, "special_tokens_map.json")
    if os.path.isfile(legacy_path):  # older checkpoints keep their tokens here only
        tokens.update(_tokens_from_config(_read_json(legacy_path), legacy_path))
    tokens.update(_tokens_from_config(config, config_path))
    return config, config_path, tokens


def _load_dir(path: str, name: str):
    config, config_path, tokens = _dir_config(path)
    # As transformers: template files (chat_template.jinja = "default", and
    # additional_chat_templates/<name>.jinja) replace tokenizer_config.json's "chat_template".
    files = {}
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        files["default"] = jinja_path
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for entry in sorted(os.listdir(extra_dir)):
            if entry.endswith(".jinja"):
                files.setdefault(entry[:-len(".jinja")], os.path.join(extra_dir, entry))
    if files:
        if name not in files:
            raise ChatTemplateError(
                f"{path} has chat template files {sorted(files)} and none named {name!r}")
        return _read_text(files[name]), tokens, files[name]
    return _select_template(config.get("chat_template"), name, config_path), tokens, config_path


def _gguf_string(reader, key: str) -> Optional[str]:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _load_gguf(path: str, name: str):
    import gguf  # only GGUF models need it

    reader = gguf.GGUFReader(path)
    key = "tokenizer.chat_template" if name == "default" else f"tokenizer.chat_template.{name}"
    source = _gguf_string(reader, key)
    tokens = {}
    vocab = reader.fields.get("tokenizer.ggml.tokens")
    if vocab is not None:
        for token_name, id_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                   ("unk_token", "unknown_token_id"),
                                   ("pad_token", "padding_token_id")):
            field = reader.fields.get(f"tokenizer.ggml.{id_key}")
            if field is None:
                continue
            token_id = int(field.parts[field.data[0]][0])
            if 0 <= token_id < len(vocab.data):
                tokens[token_name] = bytes(vocab.parts[vocab.data[token_id]]).decode(
                    "utf-8", errors="replace")
    return source, tokens, path


def _load(path, name: str):
    """(template source or None, special tokens, file it came from)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return _load_dir(p, name)
    if not os.path.isfile(p):
        raise ModelNotFoundError(f"{p} does not exist")
    if p.endswith(".gguf"):
        return _load_gguf(p, name)
    if p.endswith(".json"):  # a tokenizer_config.json, or any JSON with "chat_template"
        config = _read_json(p)
        source = _select_template(config.get("chat_template"), name, p)
        return source, _tokens_from_config(config, p), p
    return _read_text(p), {}, p  # a bare Jinja file


def load_special_tokens(path) -> dict:
    """The named special tokens (bos_token, eos_token, ...) of a model directory, a
    tokenizer_config.json or a GGUF file; {} when there are none."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return _dir_config(p)[2]
    return _load(p, "default")[1]


def load_chat_template(path, name: str = "default") -> Optional[ChatTemplate]:
    """The chat template a model ships, or None when it has none.

    `path` is a model directory (chat_template.jinja, else "chat_template" in
    tokenizer_config.json: a string, or the list of named templates from which `name` is taken),
    a tokenizer_config.json, a GGUF file (`tokenizer.chat_template`), or a bare .jinja file.
    Special tokens come from tokenizer_config.json (strings or {"content": ...} dicts), falling
    back to special_tokens_map.json, or from the GGUF vocabulary.
    """
    source, tokens, origin = _load(path, name)
    if source is None:
        return None
    return ChatTemplate(source, origin=origin, **tokens)


def resolve_chat_template(model_path, chat_template: Optional[str] = None) -> ChatTemplate:
    """What `--chat-template` means. None: the model's own template, else NoChatTemplateError;
    "chatml": CHATML_TEMPLATE with the model's special tokens; anything else: a path to a .jinja
    file, a tokenizer_config.json or a model directory whose template to use."""
    if chat_template is None:
        template = load_chat_template(model_path)
        if template is None:
            raise NoChatTemplateError(
                f"{os.fspath(model_path)} ships no chat template (looked for chat_template.jinja, "
                f"\"chat_template\" in tokenizer_config.json, or tokenizer.chat_template in a "
                f"GGUF), and llm_fast will not guess one: a wrong template silently degrades the "
                f"replies. Pass --chat-template chatml to use the ChatML format "
                f"(<|im_start|>role\\n...<|im_end|>), or --chat-template FILE with a Jinja "
                f"template file.")
        return template
    tokens = load_special_tokens(model_path)
    if chat_template == "chatml":
        return ChatTemplate.chatml(**tokens)
    if not os.path.exists(os.fspath(chat_template)):
        raise ChatTemplateError(
            f"--chat-template {os.fspath(chat_template)!r} is neither 'chatml' nor an existing "
            f"file or directory")
    source, file_tokens, origin = _load(chat_template, "default")
    if source is None:
        raise NoChatTemplateError(f"{origin} holds no chat template")
    return ChatTemplate(source, origin=origin, **{**tokens, **file_tokens})
