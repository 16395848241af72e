"""Tokenizer wrapper (HF `tokenizers`), BOS/EOS handling and streaming detokenization."""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelNotFoundError


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_content(tok) -> Optional[str]:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """Text <-> ids for one model.

    eos_token_ids is a set: generation ends at any of them (e.g. <|im_end|> and <|endoftext|>).
    decode() drops every special token id (some tokenizers, like the story model's, mark their
    BOS/EOS as `normalized` added tokens that skip_special_tokens alone does not remove).
    """

    def __init__(self, tokenizer: _HFTokenizer, bos_token_id: Optional[int] = None,
                 eos_token_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None):
        self.tk = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(int(e) for e in eos_token_ids)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.bos_token = bos_token if bos_token is not None else self._token_str(bos_token_id)
        eos_first = min(self.eos_token_ids) if self.eos_token_ids else None
        self.eos_token = eos_token if eos_token is not None else self._token_str(eos_first)
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items()
                                     if t.special)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _token_str(self, i):
        return None if i is None else self.tk.id_to_token(int(i))

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise ModelNotFoundError(f"{path}: no tokenizer.json")
        try:
            tk = _HFTokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{tj}: cannot be read by tokenizers ({e})") from None
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        cfg = _read_json(os.path.join(path, "config.json"))
        bos_str = _token_content(tcfg.get("bos_token"))
        eos_str = _token_content(tcfg.get("eos_token"))
        bos_id = cfg.get("bos_token_id", gen.get("bos_token_id"))
        if bos_str is not None and tk.token_to_id(bos_str) is not None:
            bos_id = tk.token_to_id(bos_str)
        eos = set(_ids(cfg.get("eos_token_id"))) | set(_ids(gen.get("eos_token_id")))
        if eos_str is not None and tk.token_to_id(eos_str) is not None:
            eos.add(tk.token_to_id(eos_str))
        from .chat_template import load_chat_template  # one place reads template files
        template = load_chat_template(path)
        template = template.source if template is not None else None
        return cls(tk, bos_token_id=bos_id, eos_token_ids=eos,
                   add_bos=bool(tcfg.get("add_bos_token", False)), chat_template=template,
                   bos_token=bos_str, eos_token=eos_str)

    @classmethod
    def from_gguf(cls, path: str, gguf_data=None) -> "Tokenizer":
        from .gguf_file import load_gguf
        g = gguf_data if gguf_data is not None else load_gguf(path)
        return cls(g.tokenizer, bos_token_id=g.bos_token_id, eos_token_ids=g.eos_token_ids,
                   add_bos=g.add_bos, chat_template=g.chat_template)

    # ----------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Ids of text. With add_special_tokens, the tokenizer's post-processor runs and BOS is
        ensured when the model wants one; chat prompts (already rendered with their special
        tokens) are encoded with add_special_tokens=False so no second BOS appears."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self.tk.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids) -> str:
        """Text of ids with every special token removed."""
        return self.tk.decode([int(i) for i in ids if int(i) not in self.special_ids],
                              skip_special_tokens=True)

    def detokenizer(self, context_ids=()) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, context_ids)


class StreamingDetokenizer:
    """Incremental, UTF-8 safe detokenization.

    Text is emitted only once the decoded window no longer ends in an incomplete character
    (U+FFFD), and each piece is the difference between decoding the window with and without the
    new ids, so word-initial spaces and byte-fallback sequences come out right. The pieces
    concatenate to decode(all ids). `context_ids` (e.g. the prompt's last tokens) seed the
    window so the first generated token keeps its leading space.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids=()):
        self.tokenizer = tokenizer
        ctx = [int(i) for i in context_ids if int(i) not in tokenizer.special_ids][-4:]
        # Start the window on a character boundary: a window opening inside a multi-byte
        # character (byte-fallback tokens) would decode to U+FFFD for that character's bytes.
        while ctx and tokenizer.tk.decode(ctx, skip_special_tokens=True).startswith("\ufffd"):
            ctx = ctx[1:]
        self.ids = list(ctx)
        self.prefix_offset = 0
        self.read_offset = len(ctx)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Feed one id; return the newly complete text (possibly "")."""
        if int(token_id) in self.tokenizer.special_ids:
            return ""
        self.ids.append(int(token_id))
        dec = self.tokenizer.tk.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = dec(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd") and full.startswith(prefix):
            piece = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        dec = self.tokenizer.tk.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = dec(self.ids[self.prefix_offset:], skip_special_tokens=True)
        piece = full[len(prefix):] if full.startswith(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += piece
        return piece
