"""Write the Hugging Face transformers parity goldens used by tests/test_parity_hf.py.

Needs torch and transformers (not needed to run the tests):

    pip install torch==2.13.0 transformers
    python scripts/make_fixtures.py [--story PATH] [--out tests/fixtures]

Writes
  tests/fixtures/story_golden.npz
      The story model (TinyStories-656K, ../shared/models/story; read in place, never copied):
      logits of every prompt position from one forward, 60 greedy decode steps through HF's
      KV cache, and the full greedy continuation until EOS.
  tests/fixtures/models/<name>/{config.json, generation_config.json, model.safetensors, golden.npz}
      Tiny seeded random-weight models (2 layers) covering tied/untied embeddings, MHA/GQA/MQA,
      head_dim not a power of two or not hidden/heads, several rope_theta and rms_norm_eps,
      the Mistral architecture name, BF16 and F16 storage, and a transformers-4.x style config.

Every golden is computed in float32 with eager attention by a model re-loaded from the files
just written (for BF16/F16 files: upcast to float32 at load, as llm_fast does), so the goldens
describe exactly what is on disk. Everything is seeded; running twice gives identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STORY = REPO.parent / "shared" / "models" / "story"
DEFAULT_OUT = REPO / "tests" / "fixtures"

STORY_PROMPT_IDS = [1, 80, 147, 201, 282, 57]  # "Once upon a time" with BOS (see models/README.md)
STORY_EOS = 2
STORY_DECODE_STEPS = 60
STORY_MAX_NEW = 400
RANDOM_PROMPT_LEN = 12
RANDOM_DECODE_STEPS = 20

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Spec:
    """One seeded random model. `config` goes to LlamaConfig/MistralConfig unchanged."""

    name: str
    seed: int
    config: dict
    arch: str = "llama"  # "llama" | "mistral"
    dtype: str = "float32"  # storage dtype of model.safetensors
    legacy_config: bool = False  # rewrite config.json the way transformers 4.x wrote it
    notes: str = ""
    covers: list = field(default_factory=list)


def _cfg(hidden, heads, kv, inter, vocab, theta, eps, tied, max_pos=128, head_dim=None, **extra):
    c = dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        rope_theta=theta,
        rms_norm_eps=eps,
        tie_word_embeddings=tied,
        max_position_embeddings=max_pos,
        num_hidden_layers=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    if head_dim is not None:
        c["head_dim"] = head_dim
    c.update(extra)
    return c


# Odd sizes (vocab 257, intermediate 97, ...) on purpose: they exercise kernel tails.
SPECS = [
    Spec("llama_untied_mha", 101,
         _cfg(32, 4, 4, 56, 131, 500000.0, 1e-5, False),
         legacy_config=True,
         covers=["untied", "MHA", "rope_theta 5e5", "eps 1e-5", "legacy 4.x config.json (top-level rope_theta)"]),
    Spec("llama_tied_gqa2", 102,
         _cfg(32, 4, 2, 56, 157, 10000.0, 1e-6, True, max_pos=256),
         covers=["tied (file stores only embed_tokens)", "GQA 2", "rope_theta 1e4", "eps 1e-6"]),
    Spec("llama_hd12_gqa3", 103,
         _cfg(72, 6, 2, 40, 97, 1000000.0, 1e-5, False),
         covers=["head_dim 12 (not a power of two)", "GQA 3", "rope_theta 1e6", "eps 1e-5", "untied"]),
    Spec("llama_explicit_head_dim", 104,
         _cfg(32, 4, 2, 48, 113, 10000.0, 1e-6, True, head_dim=20),
         covers=["explicit head_dim 20 != hidden/heads (q_proj 32 -> 80)", "tied", "GQA 2", "eps 1e-6"]),
    Spec("mistral_gqa2", 105,
         _cfg(32, 4, 2, 48, 97, 1000000.0, 1e-5, False, sliding_window=None),
         arch="mistral",
         covers=["MistralForCausalLM", "GQA 2", "rope_theta 1e6", "eps 1e-5", "untied"]),
    Spec("llama_bf16", 106,
         _cfg(48, 4, 2, 64, 131, 500000.0, 1e-5, False),
         dtype="bfloat16",
         covers=["BF16 safetensors", "GQA 2", "head_dim 12", "rope_theta 5e5", "untied"]),
    Spec("llama_f16_mqa", 107,
         _cfg(48, 6, 1, 64, 131, 10000.0, 1e-6, True),
         dtype="float16",
         covers=["F16 safetensors", "MQA (n_kv 1)", "tied", "eps 1e-6"]),
]


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


EMBED_STD = 0.05  # small like trained models: the first RMSNorm then depends visibly on eps


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Replace HF's init (std 0.02, norms = 1: near-uniform logits) by weights with O(1) signals.

    Norm weights ~ 1 + 0.2 N(0,1) so a loader that ignores them fails; embeddings ~ 0.05 N(0,1)
    (rms 0.05 makes eps 1e-5 vs 1e-6 a ~1e-3 relative change at layer 0); projections ~
    N(0,1)/sqrt(fan_in) so attention scores are O(1) and patterns non-trivial; the output
    head gets 2x that so greedy choices have clear margins. Tied models reuse the small
    embedding as the head, so their final norm weight is scaled up to give the same logit scale.
    """
    for name, p in model.named_parameters():  # tied weights are listed once
        if p.ndim == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(EMBED_STD * torch.randn(p.shape))
        elif name == "lm_head.weight":
            p.copy_(2.0 * torch.randn(p.shape) / math.sqrt(p.shape[1]))
        else:
            p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
    if model.config.tie_word_embeddings:
        model.model.norm.weight.mul_(2.0 / (EMBED_STD * math.sqrt(model.config.hidden_size)))


@torch.no_grad()
def run_golden(model, prompt_ids: list[int], n_decode: int, stop_id: int | None = None, max_new: int = 0):
    """One forward of the whole prompt, then greedy decode steps one token at a time via HF's cache.

    Returns prompt_logits (P, V), decode_ids (n_decode,), decode_logits (n_decode, V),
    greedy_ids (prompt + greedy tokens, up to and including stop_id or max_new new tokens),
    margins (top1 - top2 of every greedy choice).
    """
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    prompt_logits = out.logits[0].float().numpy().copy()
    past = out.past_key_values
    last = prompt_logits[-1]
    max_new = max(max_new, n_decode)
    tokens, margins, decode_logits, greedy = [], [], [], None
    step = 0
    while True:
        tok = int(np.argmax(last))
        top2 = np.sort(last)[-2:]
        tokens.append(tok)
        margins.append(float(top2[1] - top2[0]))
        if greedy is None and (tok == stop_id or len(tokens) >= max_new):
            greedy = list(tokens)
        if greedy is not None and step >= n_decode:
            break
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        last = out.logits[0, -1].float().numpy().copy()
        if step < n_decode:  # decode steps go on past EOS: they test the cache, not the story
            decode_logits.append(last)
        step += 1
    decode_ids = tokens[:n_decode]
    margins = margins[: len(greedy)]
    return (
        prompt_logits.astype(np.float32),
        np.array(decode_ids, dtype=np.int64),
        np.stack(decode_logits).astype(np.float32),
        np.array(list(prompt_ids) + greedy, dtype=np.int64),
        np.array(margins, dtype=np.float32),
    )


@torch.no_grad()
def check_cache_consistency(model, prompt_ids, decode_ids, decode_logits) -> float:
    """HF's own sanity: one full forward over prompt + decoded tokens == the KV-cache steps."""
    full = torch.tensor([list(prompt_ids) + list(decode_ids)], dtype=torch.long)
    logits = model(input_ids=full, use_cache=False).logits[0].float().numpy()
    return float(np.abs(logits[len(prompt_ids) :] - decode_logits).max())


def load_fp32(cls, folder: Path):
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def meta_array(meta: dict) -> np.ndarray:
    return np.array(json.dumps(meta, sort_keys=True))  # 0-d unicode array: loads without pickle


def make_story(story: Path, out: Path) -> None:
    if not (story / "model.safetensors").is_file():
        print(f"story model not found at {story}; skipping story_golden.npz", file=sys.stderr)
        return
    model = load_fp32(LlamaForCausalLM, story)
    prompt_logits, decode_ids, decode_logits, greedy_ids, margins = run_golden(
        model, STORY_PROMPT_IDS, STORY_DECODE_STEPS, stop_id=STORY_EOS, max_new=STORY_MAX_NEW
    )
    consistency = check_cache_consistency(model, STORY_PROMPT_IDS, decode_ids, decode_logits)
    # transformers' own greedy generate() must agree with the manual loop
    gen = model.generate(
        torch.tensor([STORY_PROMPT_IDS]), do_sample=False, max_new_tokens=STORY_MAX_NEW,
        eos_token_id=STORY_EOS, pad_token_id=STORY_EOS,
    )[0].numpy()
    if not np.array_equal(gen, greedy_ids):
        raise RuntimeError(f"generate() {gen.tolist()} != manual greedy loop {greedy_ids.tolist()}")
    meta = dict(
        versions(),
        model="TinyStories-656K (../shared/models/story)",
        model_sha256=sha256(story / "model.safetensors"),
        prompt="Once upon a time",
        eos_id=STORY_EOS,
        max_new_tokens=STORY_MAX_NEW,
        dtype="float32",
        attn_implementation="eager",
        hf_cache_vs_full_forward_max_abs=consistency,
        min_greedy_margin=float(margins.min()),
    )
    path = out / "story_golden.npz"
    np.savez_compressed(
        path,
        prompt_ids=np.array(STORY_PROMPT_IDS, dtype=np.int64),
        prompt_logits=prompt_logits,
        decode_ids=decode_ids,
        decode_logits=decode_logits,
        greedy_ids=greedy_ids,
        greedy_margins=margins,
        meta=meta_array(meta),
    )
    n_new = len(greedy_ids) - len(STORY_PROMPT_IDS)
    ended = "EOS" if greedy_ids[-1] == STORY_EOS else f"cap {STORY_MAX_NEW}"
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size:,} B): prompt {prompt_logits.shape}, "
          f"decode {decode_logits.shape}, greedy {n_new} new tokens until {ended}, "
          f"min margin {margins.min():.4f}, HF cache-vs-full {consistency:.2e}")


def make_random(spec: Spec, out: Path) -> None:
    cls_cfg, cls_model = (LlamaConfig, LlamaForCausalLM) if spec.arch == "llama" else (MistralConfig, MistralForCausalLM)
    config = cls_cfg(**spec.config)
    torch.manual_seed(spec.seed)
    model = cls_model(config).eval()
    randomize_(model)
    folder = out / "models" / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    with tempfile.TemporaryDirectory() as tmp:
        model.to(DTYPES[spec.dtype]).save_pretrained(tmp, safe_serialization=True)
        folder.mkdir(parents=True)
        for fname in ("config.json", "generation_config.json", "model.safetensors"):
            if (Path(tmp) / fname).is_file():
                shutil.copy(Path(tmp) / fname, folder / fname)
        extra = sorted(set(p.name for p in Path(tmp).iterdir()) - {"config.json", "generation_config.json", "model.safetensors"})
        if extra:
            print(f"  {spec.name}: dropped {extra}")
    if spec.legacy_config:
        # transformers 4.x wrote rope_theta at top level and "torch_dtype"; v5 writes
        # "rope_parameters": {"rope_theta": ..., "rope_type": "default"} and "dtype".
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["torch_dtype"] = cfg.pop("dtype")
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # Goldens come from the files on disk, upcast to float32 (rounded BF16/F16 weights included).
    ref = load_fp32(cls_model, folder)
    theta = ref.config.rope_parameters["rope_theta"]
    if theta != spec.config["rope_theta"]:
        raise RuntimeError(f"{spec.name}: reloaded rope_theta {theta} != {spec.config['rope_theta']}")
    rng = np.random.default_rng(spec.seed)
    prompt = [1] + rng.integers(3, spec.config["vocab_size"], RANDOM_PROMPT_LEN - 1).tolist()
    prompt_logits, decode_ids, decode_logits, greedy_ids, margins = run_golden(ref, prompt, RANDOM_DECODE_STEPS)
    consistency = check_cache_consistency(ref, prompt, decode_ids, decode_logits)
    with open(folder / "model.safetensors", "rb") as f:  # safetensors header: tensor names
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = sorted(k for k in header if k != "__metadata__")
    meta = dict(
        versions(),
        name=spec.name,
        arch=type(ref).__name__,
        seed=spec.seed,
        storage_dtype=spec.dtype,
        legacy_config=spec.legacy_config,
        covers=spec.covers,
        stores_lm_head="lm_head.weight" in tensors,
        stores_embed_tokens="model.embed_tokens.weight" in tensors,
        attn_implementation="eager",
        hf_cache_vs_full_forward_max_abs=consistency,
        min_greedy_margin=float(margins.min()),
    )
    np.savez_compressed(
        folder / "golden.npz",
        prompt_ids=np.array(prompt, dtype=np.int64),
        prompt_logits=prompt_logits,
        decode_ids=decode_ids,
        decode_logits=decode_logits,
        greedy_ids=greedy_ids,
        greedy_margins=margins,
        meta=meta_array(meta),
    )
    size = sum(p.stat().st_size for p in folder.iterdir())
    c = ref.config
    print(f"wrote {folder.relative_to(REPO)}/ ({size:,} B) {meta['arch']} {spec.dtype}: hidden {c.hidden_size}, "
          f"heads {c.num_attention_heads}/{c.num_key_value_heads}, head_dim {c.head_dim}, "
          f"vocab {c.vocab_size}, theta {theta:g}, eps {c.rms_norm_eps:g}, tied {c.tie_word_embeddings} "
          f"(lm_head stored: {meta['stores_lm_head']}); |logits| max {np.abs(prompt_logits).max():.2f}, "
          f"min margin {margins.min():.4f}, HF cache-vs-full {consistency:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--story", type=Path, default=DEFAULT_STORY, help="folder of the story model")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures folder")
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print("versions:", json.dumps(versions()))
    args.out.mkdir(parents=True, exist_ok=True)
    make_story(args.story, args.out)
    for spec in SPECS:
        make_random(spec, args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file() and p.suffix in (".npz", ".json", ".safetensors"))
    print(f"total fixture size: {total:,} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
