"""Gemma's chat format as a Jinja template for the tokenizer.

Gemma has no system role: a leading system message is folded into the first user turn, which is
how Google's own template handles it. Assistant turns are called `model` in Gemma's format.
"""

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- if role not in ['user', 'model'] -%}"
    "{{ raise_exception('Gemma takes user and assistant turns after an optional system message') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if loop.first and system_text -%}{{ system_text | trim + '\\n\\n' }}{%- endif -%}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Token ids in Gemma 3's vocabulary: <eos> and <end_of_turn>. Generation stops at either.
GEMMA_STOP_TOKEN_IDS = (1, 106)
