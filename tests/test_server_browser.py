"""The web chat page in headless Chromium (selenium + chromedriver): it loads, sends a message,
shows the reply streaming in, and its stop / regenerate / clear buttons work.

Needs the Debian packages `chromium` and `chromium-driver` and `pip install selenium`; skipped
otherwise. The reply comes from SmolLM2-135M-Instruct when it loads, else from the tiny random
model. A screenshot is saved under the test's tmp dir, and also to docs/screenshot-chat.png
when LLM_FAST_SAVE_SCREENSHOT is set.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import llm_fast  # noqa: E402
from llm_fast.server import create_app  # noqa: E402

from server_util import ServerThread, make_tiny_chat_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver",
                                 "/usr/lib/chromium/chromedriver") if p and os.path.exists(p)), None)
QUESTION = "What is the capital of France? Answer in one sentence."
# Records every text the streaming reply bubble shows (a MutationObserver sees each update,
# however fast the model is, where polling from the test could miss them).
RECORD_PARTIALS = """
window.__partials = [];
new MutationObserver(() => {
  const b = document.querySelector('.msg.assistant.streaming .bubble');
  if (b && b.textContent) window.__partials.push(b.textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


class SlowModel:
    """The model with a pause in every forward, so a reply streams visibly."""

    def __init__(self, model, delay: float):
        self._model, self.delay = model, delay

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self._model.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,860", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chatml")
    return llm_fast.load(path)


@pytest.fixture(scope="module")
def chat_server(tiny):
    """SmolLM2 for a real answer when it loads, else the tiny model slowed to stream visibly."""
    name, model, tok, template = None, None, None, None
    try:
        from llm_fast.chat_template import resolve_chat_template
        from llm_fast.loader import resolve_model_path
        model, tok = llm_fast.load(None)
        template = resolve_chat_template(resolve_model_path(None))
        name = "SmolLM2-135M-Instruct"
    except Exception:  # not installed, or this build cannot read GGUF yet
        model, tok = tiny
        model, name = SlowModel(model, 0.02), "tiny-chatml"
    with ServerThread(create_app(model, tok, name, chat_template=template)) as s:
        yield s


@pytest.fixture(scope="module")
def slow_server(tiny):
    model, tok = tiny
    with ServerThread(create_app(SlowModel(model, 0.03), tok, "tiny-chatml")) as s:
        yield s


def _by_css(d, css):
    from selenium.webdriver.common.by import By
    return d.find_elements(By.CSS_SELECTOR, css)


def _wait(condition, timeout, what):
    from selenium.common.exceptions import StaleElementReferenceException
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:  # the page re-rendered between find and read
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _open(d, url, max_tokens, seed=None):
    d.get(url + "/")
    d.execute_script("localStorage.clear();")
    d.get(url + "/")
    _wait(lambda: "connecting" not in _by_css(d, "#model-name")[0].text, 15, "the model name")
    _set(d, "#max_tokens", max_tokens)
    if seed is not None:
        _set(d, "#seed", seed)


def _set(d, css, value):
    box = _by_css(d, css)[0]
    box.clear()
    box.send_keys(str(value))


def _send(d, text):
    prompt = _by_css(d, "#prompt")[0]
    prompt.send_keys(text)
    _by_css(d, "#send")[0].click()


def test_page_streams_a_reply(driver, chat_server, tmp_path):
    d = driver
    _open(d, chat_server.url, 60, seed=0)  # seeded: the screenshot is reproducible
    assert d.title == "llm_fast chat"
    d.find_element("id", "system").send_keys("You are a concise assistant.")
    d.execute_script(RECORD_PARTIALS)
    _send(d, QUESTION)
    user = _wait(lambda: _by_css(d, ".msg.user .bubble"), 5, "the user's message")
    assert user[0].text == QUESTION
    _wait(lambda: _by_css(d, ".msg.assistant"), 10, "the reply bubble")
    _wait(lambda: not _by_css(d, ".msg.assistant.streaming"), 120, "the end of the reply")
    reply = _by_css(d, ".msg.assistant .bubble")[-1].text
    assert reply
    # streamed: the bubble showed growing prefixes of the reply before the whole of it
    partials = d.execute_script("return window.__partials;")
    assert len(set(partials)) >= 2, partials
    assert all(reply.startswith(p.strip()) for p in partials), (partials, reply)
    meta = _by_css(d, ".msg.assistant .meta")[-1].text
    assert "tokens" in meta and "tok/s" in meta, meta
    assert not _by_css(d, ".msg.error")
    # a second turn: the reply comes after the first, the conversation is sent whole
    _send(d, "And what is it famous for?")
    _wait(lambda: len(_by_css(d, ".msg.assistant")) == 2 and not _by_css(d, ".msg.streaming"),
          120, "the second reply")
    assert _by_css(d, ".msg.assistant .bubble")[-1].text
    assert not _by_css(d, ".msg.error")
    shot = tmp_path / "screenshot-chat.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    if os.environ.get("LLM_FAST_SAVE_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "screenshot-chat.png")


def test_page_stop_regenerate_clear(driver, slow_server):
    d = driver
    _open(d, slow_server.url, 400)  # 400 tokens at 30 ms: long enough to stop midway
    _send(d, "Hello!")
    _wait(lambda: [b for b in _by_css(d, ".msg.assistant.streaming .bubble") if b.text], 30,
          "streaming to start")
    assert _by_css(d, "#stop")[0].is_enabled() and not _by_css(d, "#send")[0].is_enabled()
    _by_css(d, "#stop")[0].click()
    _wait(lambda: not _by_css(d, ".msg.assistant.streaming"), 10, "the reply to stop")
    assert "stopped" in _by_css(d, ".msg.assistant .meta")[-1].text
    first = _by_css(d, ".msg.assistant .bubble")[-1].text
    assert first
    # multi-turn: a second question gets a second reply after the first
    _set(d, "#max_tokens", 8)
    _send(d, "And then?")
    _wait(lambda: len(_by_css(d, ".msg.assistant")) == 2 and not _by_css(d, ".msg.streaming"),
          30, "the second reply")
    assert [b.text for b in _by_css(d, ".msg.user .bubble")] == ["Hello!", "And then?"]
    # regenerate replaces the last reply (same number of messages)
    _by_css(d, "#regenerate")[0].click()
    _wait(lambda: not _by_css(d, ".msg.streaming") and _by_css(d, "#send")[0].is_enabled(), 30,
          "the regenerated reply")
    assert len(_by_css(d, ".msg.assistant")) == 2 and len(_by_css(d, ".msg.user")) == 2
    _by_css(d, "#clear")[0].click()
    assert not _by_css(d, ".msg") and _by_css(d, ".empty")
