"""Tool calls in generated text, where a turn ends, and the tool turn the chat template inserts."""

import pytest

from rlcore.models import char_tokenizer
from rlcore.toolcall import ToolTurns, decode_turn, find_call, stop_token_ids, tokens_through

TOK = char_tokenizer()
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>'

# The shape of Qwen2.5's template for tool results (a user turn wrapping <tool_response>), trimmed.
QWEN_LIKE = (
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_hermes_call_is_the_first_complete_one_and_ends_where_it_closes():
    text = f"let me compute. {CALL} then {CALL.replace('12*34', '1+1')}"
    call = find_call(text, "hermes")
    assert call.name == "calculator" and call.arguments == {"expression": "12*34"} and call.error is None
    assert text[: call.end].endswith("</tool_call>") and call.end == len("let me compute. ") + len(CALL)
    assert find_call("<tool_call>{\"name\": \"calculator\"", "hermes") is None  # not closed: no call yet
    stringified = find_call('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "hermes")
    assert stringified.arguments == {"x": 1} and stringified.error is None


@pytest.mark.parametrize("body, error", [
    ("{not json}", "not valid JSON"),
    ('["calculator"]', 'must be a JSON object {"name"'),
    ('{"name": "calculator", "arguments": [1]}', '"arguments" of the tool call must be a JSON object'),
])
def test_an_unreadable_call_is_still_a_call_with_the_reason_for_the_model(body, error):
    call = find_call(f"<tool_call>{body}</tool_call> more", "hermes")
    assert call is not None and error in call.error and call.end == len(f"<tool_call>{body}</tool_call>")


def test_python_block_calls_the_python_tool():
    text = "Compute it:\n```python\nx = 12 * 34\nprint(x)\n```\nand then ```python\nprint(0)\n```"
    call = find_call(text, "python_block")
    assert call.name == "python" and call.arguments == {"code": "x = 12 * 34\nprint(x)\n"}
    assert text[: call.end].endswith("print(x)\n```")
    assert find_call("```python\nprint(1)\n", "python_block") is None  # still open
    assert find_call("```bash\nls\n```", "python_block") is None
    with pytest.raises(ValueError, match="rollout.tool_format='xml'"):
        find_call(text, "xml")


def test_tokens_through_keeps_whole_tokens_up_to_the_calls_end():
    ids = TOK(CALL + "\ntool: hallucinated")["input_ids"]
    call = find_call(decode_turn(TOK, ids), "hermes")
    keep = tokens_through(TOK, ids, call.end)
    assert keep == len(CALL) and TOK.decode(ids[:keep]) == CALL  # one character per token


def test_closing_tag_is_a_stop_id_only_where_it_is_one_token():
    assert stop_token_ids(TOK, "hermes") == []  # 12 characters: the turn is cut instead
    qwenish = char_tokenizer()
    qwenish.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    (close,) = stop_token_ids(qwenish, "hermes")
    assert qwenish.convert_ids_to_tokens(close) == "</tool_call>"
    assert stop_token_ids(qwenish, "python_block") == []
    ids = qwenish(CALL + "xyz")["input_ids"]
    call = find_call(decode_turn(qwenish, ids), "hermes")  # special tokens are kept for the search
    assert ids[tokens_through(qwenish, ids, call.end) - 1] == close


def test_tool_turn_of_the_character_template():
    turns = ToolTurns(TOK)
    assert turns.text("calculator", "408") == "\ntool: 408\nassistant: "
    assert TOK.decode(turns.ids("calculator", "408")) == "\ntool: 408\nassistant: "


def test_tool_turn_of_a_qwen_like_template_closes_the_assistant_turn():
    tok = char_tokenizer()
    tok.chat_template = QWEN_LIKE
    assert ToolTurns(tok).text("calculator", "408") == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_templates_that_cannot_give_a_tool_turn_are_refused_by_name():
    tok = char_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="needs a chat template"):
        ToolTurns(tok)
    tok.chat_template = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}" \
                        "{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot render a tool turn.*no tools"):
        ToolTurns(tok)
    # A template that drops the assistant's text once a tool follows: the added tokens are unknowable.
    tok.chat_template = "{% for m in messages %}{% if loop.last or m.role != 'assistant' %}{{ m.content }}" \
                        "{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="renders an assistant turn differently"):
        ToolTurns(tok)
