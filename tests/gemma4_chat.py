"""A tiny pair that speaks Gemma 4's chat format: the E2B-like fixture pair with Gemma 4's
special tokens (turns, tool declarations, calls and responses, the string delimiter, the
thought channel) in its tokenizer and a chat template written here in Gemma 4's layout.

The fixture tokenizer's last BPE merges make room: their ids become the special tokens, so
the vocabulary (and the model) keep their size. The template renders what Gemma 4's does:
`<|turn>system` with `<|think|>` and `<|tool>declaration:NAME{...}<tool|>` entries,
model turns with `<|tool_call>call:NAME{key:value}<tool_call|>`, results as
`<|tool_response>response:NAME{value:...}<tool_response|>` inside the model's
turn (an assistant message's `tool_responses`, as Google's template reads them), and
thinking as `<|channel>thought ... <channel|>`. End of generation: `<eos>`,
`<turn|>` and `<|tool_response>` (a model that has called tools waits for the results).
"""

import json
import shutil
from pathlib import Path

SPECIALS = ["<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
            '<|"|>', "<|channel>", "<channel|>", "<|think|>"]
TURN_START, TURN_END = "<|turn>", "<turn|>"

TEMPLATE = r"""{%- macro value(v) -%}
{%- if v is string -%}<|"|>{{ v }}<|"|>
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is mapping -%}{ {%- for k, x in v | dictsort -%}{{ k }}:{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%} }
{%- elif v is iterable -%}[ {%- for x in v -%}{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%} ]
{%- elif v is none -%}null
{%- else -%}{{ v }}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set rest = messages -%}
{%- set system = messages and messages[0]['role'] in ['system', 'developer'] -%}
{%- if enable_thinking or tools or system -%}
<|turn>system
{% if enable_thinking %}<|think|>
{% endif %}{% if system %}{{ messages[0]['content'] | trim }}{% set rest = messages[1:] %}{% endif -%}
{%- for tool in tools or [] -%}
<|tool>declaration:{{ tool['function']['name'] }}{{ value({'description': tool['function'].get('description', ''), 'parameters': tool['function'].get('parameters', {})}) }}<tool|>
{%- endfor -%}
<turn|>
{% endif -%}
{%- set ns = namespace(open=false) -%}
{%- for m in rest -%}
{%- if m['role'] == 'assistant' -%}
{%- if not ns.open -%}<|turn>model
{% endif -%}
{%- for call in m.get('tool_calls') or [] -%}
<|tool_call>call:{{ call['function']['name'] }}{{ value(call['function']['arguments']) }}<tool_call|>
{%- endfor -%}
{%- for r in m.get('tool_responses') or [] -%}
<|tool_response>response:{{ r['name'] }}{{ value(r['response'] if r['response'] is mapping else {'value': r['response']}) }}<tool_response|>
{%- endfor -%}
{{ (m['content'] or '') | trim }}
{%- if m.get('tool_responses') and not m['content'] -%}{%- set ns.open = true -%}{%- else -%}<turn|>
{% set ns.open = false -%}{%- endif -%}
{%- else -%}
{%- if ns.open -%}<turn|>
{% set ns.open = false -%}{%- endif -%}
<|turn>{{ m['role'] }}
{{ m['content'] | trim }}<turn|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open -%}<|turn>model
{% endif -%}"""


def make_chat_pair(target: Path, out: Path) -> Path:
    """A copy of the fixture `target` whose tokenizer carries Gemma 4's special tokens and
    chat template; returns the copy's directory."""
    if out.exists():
        return out
    shutil.copytree(target, out)
    path = out / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    freed = sorted(vocab.values())[-len(SPECIALS):]  # the newest merges' ids
    freed_tokens = {by_id[i] for i in freed}
    for t in freed_tokens:
        del vocab[t]
    tokenizer["model"]["merges"] = [m for m in tokenizer["model"]["merges"]
                                    if "".join(m) not in freed_tokens and not set(m) & freed_tokens]
    renamed = {"<start_of_turn>": TURN_START, "<end_of_turn>": TURN_END}
    for old, new in renamed.items():
        vocab[new] = vocab.pop(old)
    added = [a for a in tokenizer["added_tokens"] if a["content"] not in renamed]
    added += [dict(added_tokens_entry(vocab[new], new)) for new in renamed.values()]
    for i, content in zip(freed, SPECIALS):
        vocab[content] = i
        added.append(added_tokens_entry(i, content))
    tokenizer["added_tokens"] = sorted(added, key=lambda a: a["id"])
    path.write_text(json.dumps(tokenizer))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["extra_special_tokens"] = [TURN_START, TURN_END, *SPECIALS]
    config_path.write_text(json.dumps(config, indent=1))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    generation = json.loads((out / "generation_config.json").read_text())
    generation["eos_token_id"] = [1, vocab[TURN_END], vocab["<|tool_response>"]]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=1))
    return out


def added_tokens_entry(i: int, content: str) -> dict:
    return dict(id=i, content=content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                special=True)
