"""`python -m llm_fast generate` as a black box: the greedy text equals the library's, and every
error is one line on stderr (no traceback) with a non-zero exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STORY_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "story"
PROMPT = "Once upon a time"


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llm_fast", *map(str, args)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def story_dir():
    if not (STORY_DIR / "model.safetensors").is_file():
        pytest.skip(f"story model not found at {STORY_DIR}")
    return STORY_DIR


def test_generate_greedy_matches_library(story_dir):
    import llm_fast
    from llm_fast.generate import generate
    from llm_fast.sampling import SamplingParams

    res = run_cli("generate", "--model", story_dir, PROMPT, "--greedy", "-n", 20)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout.startswith(PROMPT)
    model, tok = llm_fast.load(str(story_dir))
    want = generate(model, tok, PROMPT, 20, SamplingParams(temperature=0.0))
    assert res.stdout == PROMPT + want.text + "\n"
    assert len(want.text) > 20


def test_generate_seeded_sampling_is_reproducible(story_dir):
    args = ("generate", "--model", story_dir, PROMPT, "-n", 15, "--seed", 7, "--temperature", 0.9,
            "--no-echo", "--stats")
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and not a.stdout.startswith(PROMPT)
    assert "finish" in a.stderr and "Traceback" not in a.stderr


def _assert_one_line_error(res, *needles):
    assert res.returncode != 0, f"exit 0 for an error case; stdout {res.stdout!r}"
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {res.stderr!r}"
    for n in needles:
        assert str(n) in lines[0], f"{lines[0]!r} does not mention {n!r}"
    return lines[0]


def test_error_missing_model_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    res = run_cli("generate", "--model", missing, PROMPT)
    _assert_one_line_error(res, missing)
    assert res.stdout == ""


def test_error_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a model\n")
    res = run_cli("generate", "--model", f, PROMPT)
    _assert_one_line_error(res, f)


def test_error_folder_without_config(tmp_path):
    res = run_cli("generate", "--model", tmp_path, PROMPT)
    _assert_one_line_error(res, "config.json")


def test_error_broken_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    res = run_cli("generate", "--model", tmp_path, PROMPT)
    _assert_one_line_error(res, "GPT2LMHeadModel")


@pytest.mark.parametrize("args, needle", [
    (["--top-p", "3"], "top_p"),
    (["-n", "0"], "max-new-tokens"),
    (["--temperature", "abc"], "temperature"),
    (["--temperature", "-1"], "temperature"),
    (["--top-k", "-2"], "top_k"),
    (["--min-p", "1.5"], "min_p"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--threads", "0"], "threads"),
    (["--seed", "x"], "seed"),
])
def test_error_bad_arguments(story_dir, args, needle):
    res = run_cli("generate", "--model", story_dir, PROMPT, *args)
    _assert_one_line_error(res, needle)
    assert res.stdout == ""


def test_error_no_subcommand():
    res = run_cli()
    _assert_one_line_error(res)


def test_error_empty_stop_string_prints_nothing(story_dir):
    res = run_cli("generate", "--model", story_dir, PROMPT, "--stop", "")
    _assert_one_line_error(res, "stop")
    assert res.stdout == ""
