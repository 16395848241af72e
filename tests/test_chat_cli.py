"""`llm-fast chat` driven as a user would: through pipes and through a pseudo-terminal.

The expected replies come from ChatSession in this process (same model, same greedy settings):
the CLI must print exactly the library's replies, turn after turn, including after /undo and
after reloading a saved history.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import llm_fast
from llm_fast.chat import ChatSession
from llm_fast.chat_template import CHATML_TEMPLATE
from llm_fast.sampling import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
from chat_test_models import build_tiny_chatml_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "You are a helpful assistant."
N = 12  # max new tokens of the short replies


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_chatml_model(tmp_path_factory.mktemp("tiny_chatml_cli"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return llm_fast.load(tiny_dir)


@pytest.fixture(scope="session")
def bare_dir(tiny_dir, tmp_path_factory):
    """The tiny model without a chat template."""
    d = tmp_path_factory.mktemp("tiny_no_template")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(os.path.join(tiny_dir, name), d / name)
    with open(os.path.join(tiny_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return str(d)


def library_session(tiny, system=SYSTEM, max_new_tokens=N):
    model, tok = tiny
    return ChatSession(model, tok, system_prompt=system, max_new_tokens=max_new_tokens,
                       sampling=SamplingParams(temperature=0.0, top_k=40, top_p=0.95))


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["TERM"] = "dumb"
    return e


def chat_cmd(model_dir, *args, n=N):
    return [sys.executable, "-m", "llm_fast", "chat", "-m", str(model_dir), "--greedy",
            "-n", str(n), *map(str, args)]


def run_chat(model_dir, lines, *args, n=N):
    proc = subprocess.run(chat_cmd(model_dir, *args, n=n), input="".join(l + "\n" for l in lines),
                          capture_output=True, text=True, env=env(), timeout=120)
    return proc


def stdout_lines(proc):
    return proc.stdout.splitlines()


# ---------------------------------------------------------------------------------------------
# Pipes


def test_piped_two_turns_undo_stats_save_and_reload(tiny, tiny_dir, tmp_path):
    lib = library_session(tiny)
    r1 = lib.chat("Hello")
    r2 = lib.chat("What is the capital of France?")
    reused = lib.last_stats.reused_tokens
    lib.undo()
    r3 = lib.chat("Tell me a story")

    saved = tmp_path / "history.json"
    proc = run_chat(tiny_dir, ["Hello", "What is the capital of France?", "/stats", "/undo",
                               "Tell me a story", "bye", "never sent"],
                    "--system", SYSTEM, "-o", saved)
    assert proc.returncode == 0, proc.stderr
    out = stdout_lines(proc)
    assert out[0] == r1 and out[1] == r2
    assert out[2].startswith("last turn:") and f"({reused} reused from the cache" in out[2]
    assert reused > 0
    assert out[3].startswith("session: 5 messages")
    assert out[4] == r3 and len(out) == 5
    assert "removed: 'What is the capital of France?'" in proc.stderr
    assert json.loads(saved.read_text(encoding="utf-8")) == lib.history

    # reload and continue; end of input (EOF) is a normal exit and saves
    r4 = lib.chat("And then?")
    again = tmp_path / "again.json"
    proc = run_chat(tiny_dir, ["And then?"], "-i", saved, "-o", again)
    assert proc.returncode == 0, proc.stderr
    assert stdout_lines(proc) == [r4]
    assert proc.stderr == ""
    assert json.loads(again.read_text(encoding="utf-8")) == lib.history


def test_io_file_is_created_then_continued(tiny, tiny_dir, tmp_path):
    lib = library_session(tiny, system=None)
    path = tmp_path / "conv.json"
    proc = run_chat(tiny_dir, ["Hello", "quit"], "--io", path)
    assert proc.returncode == 0 and proc.stderr == ""    # a missing --io file is not an error
    assert stdout_lines(proc) == [lib.chat("Hello")]
    proc = run_chat(tiny_dir, ["What about 猫 and 😀?", "EXIT"], "--io", path)
    assert stdout_lines(proc) == [lib.chat("What about 猫 and 😀?")]
    assert json.loads(path.read_text(encoding="utf-8")) == lib.history


@pytest.mark.parametrize("content, why", [
    ("", "is empty"),
    ("  \n", "is empty"),
    ("[{\"role\": ", "is not valid JSON"),
    ("{\"role\": \"user\", \"content\": \"x\"}", "is not a chat history"),
    ("[{\"role\": \"user\", \"content\": \"x\"}]", "is not a chat history"),
    (None, "does not exist"),
])
def test_bad_history_file_starts_fresh_with_one_warning(tiny, tiny_dir, tmp_path, content, why):
    path = tmp_path / "h.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "out.json"
    proc = run_chat(tiny_dir, ["Hello"], "-i", path, "-o", out)
    assert proc.returncode == 0
    warning = proc.stderr.splitlines()
    assert len(warning) == 1 and why in warning[0] and "starting a new conversation" in warning[0]
    lib = library_session(tiny, system=None)
    assert stdout_lines(proc) == [lib.chat("Hello")]
    assert json.loads(out.read_text(encoding="utf-8")) == lib.history


def test_system_flag_overrides_the_history_file(tiny, tiny_dir, tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps([{"role": "system", "content": "old"}]), encoding="utf-8")
    proc = run_chat(tiny_dir, ["Hello"], "--io", path, "--system", SYSTEM)
    assert stdout_lines(proc) == [library_session(tiny).chat("Hello")]
    assert json.loads(path.read_text(encoding="utf-8"))[0] == {"role": "system", "content": SYSTEM}


def test_commands_and_context_overflow(tiny, tiny_dir):
    lines = ["/help", "/regenerate", "/nope", "Hello! How are you today?",
             "What is the capital of France?", "Tell me a story about a cat.", "And a dog?",
             "word " * 100, "/regenerate", "/stats", "/reset", "/undo", "Hello! How are you today?"]
    proc = run_chat(tiny_dir, lines, "--max-context", 110, "-s", SYSTEM, n=16)
    assert proc.returncode == 0, proc.stderr
    out = stdout_lines(proc)
    assert "/regenerate" in proc.stdout and "/undo" in proc.stdout      # the /help text
    err = proc.stderr
    assert "nothing to regenerate" in err and "unknown command /nope" in err
    assert "error: the message does not fit the context" in err
    assert "nothing to undo" in err and "[conversation cleared]" in err
    stats = [l for l in out if l.startswith("session:")]
    assert len(stats) == 1
    dropped = int(re.search(r"\((\d+) dropped", stats[0]).group(1))
    assert dropped > 0
    # the last reply (after /reset) is the first reply of a fresh conversation
    lib = library_session(tiny, max_new_tokens=16)
    assert out[-1] == lib.chat("Hello! How are you today?")


def test_chat_template_choice(tiny, tiny_dir, bare_dir, tmp_path):
    expected = library_session(tiny).chat("Hello")
    proc = run_chat(bare_dir, ["Hello"], "-s", SYSTEM)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "--chat-template chatml" in proc.stderr
    proc = run_chat(bare_dir, ["Hello"], "-s", SYSTEM, "--chat-template", "chatml")
    assert stdout_lines(proc) == [expected]
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML_TEMPLATE, encoding="utf-8")
    proc = run_chat(bare_dir, ["Hello"], "-s", SYSTEM, "--chat-template", jinja)
    assert stdout_lines(proc) == [expected]
    proc = run_chat(bare_dir, ["Hello"], "--chat-template", tmp_path / "missing.jinja")
    assert proc.returncode == 1 and "neither 'chatml' nor an existing file" in proc.stderr


def test_io_excludes_i_and_o(tiny_dir, tmp_path):
    proc = run_chat(tiny_dir, ["Hello"], "--io", tmp_path / "a.json", "-o", tmp_path / "b.json")
    assert proc.returncode == 1 and proc.stderr.startswith("llm-fast: error: --io")


# ---------------------------------------------------------------------------------------------
# A pseudo-terminal


def spawn(model_dir, *args, n=N):
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives the pseudo-terminal")
    cmd = chat_cmd(model_dir, *args, n=n)
    child = pexpect.spawn(cmd[0], cmd[1:], env=env(), encoding="utf-8", timeout=60,
                          dimensions=(24, 500))
    return child


def test_terminal_session_with_undo_ctrl_c_and_history(tiny, tiny_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    lib = library_session(tiny)
    r1 = lib.chat("Hello")
    r2 = lib.chat("What is the capital of France?")
    lib.undo()
    path = tmp_path / "tty.json"

    child = spawn(tiny_dir, "--system", SYSTEM, "-o", path)
    child.expect_exact("/help for commands")
    child.expect_exact(">>> ")
    child.sendline("Hello")
    child.expect_exact(r1)
    child.expect_exact(">>> ")
    child.sendline("What is the capital of France?")
    child.expect_exact(r2)
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"\((\d+) reused from the cache")
    assert int(child.match.group(1)) > 0
    child.expect_exact(">>> ")
    child.sendline("/undo")
    child.expect_exact("[removed: 'What is the capital of France?' and its reply]")
    child.expect_exact(">>> ")
    child.sendintr()                                  # Ctrl-C at the prompt: a clean exit
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads(path.read_text(encoding="utf-8")) == lib.history

    # Reload; a long reply is stopped by Ctrl-C without ending the program.
    saved_again = tmp_path / "tty2.json"
    child = spawn(tiny_dir, "--system", SYSTEM, "-i", path, "-o", saved_again, n=30000)
    child.expect_exact("[3 messages loaded from")
    child.expect_exact(">>> ")
    child.sendline("Tell me a long story")
    child.expect_exact("Tell me a long story\r\n")   # the terminal's echo
    child.expect(r"[a-zA-Z]{3}")                      # the reply is streaming
    started = time.monotonic()
    child.sendintr()
    child.expect_exact("[reply stopped]")
    assert time.monotonic() - started < 10
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect_exact("finish: interrupted")
    child.expect_exact(">>> ")
    child.sendline("/undo")
    child.expect_exact("[removed: 'Tell me a long story' and its reply]")
    child.expect_exact(">>> ")
    child.sendeof()                                   # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads(saved_again.read_text(encoding="utf-8")) == lib.history


def test_terminal_reply_streams_before_it_ends(tiny_dir):
    """Pieces reach the terminal while the reply is still being generated."""
    pexpect = pytest.importorskip("pexpect")
    child = spawn(tiny_dir, n=30000)
    child.expect_exact(">>> ")
    child.sendline("Hello")
    child.expect_exact("Hello\r\n")
    child.expect(r"[a-zA-Z]{3}")
    # the prompt has not come back yet: the reply is still running
    with pytest.raises(pexpect.TIMEOUT):
        child.expect_exact(">>> ", timeout=0.2)
    child.sendintr()
    child.expect_exact("[reply stopped]")
    child.expect_exact(">>> ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
