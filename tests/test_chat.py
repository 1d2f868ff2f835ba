"""Tests of companion.chat: identity line, batched replies, multi-turn history, clear errors."""

import pytest

from companion.chat import Assistant, generate_replies, read_identity, render_prompts
from companion.config import seed_everything
from companion.models import load_lm


@pytest.fixture(scope="module")
def tiny_llama():
    seed_everything(0)
    return load_lm("tiny-llama")


def test_read_identity_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "identity.txt"
    path.write_text("# a comment\n\n  You are Testy, a test assistant.  \nsecond line\n", encoding="utf-8")
    assert read_identity(path) == "You are Testy, a test assistant."


def test_read_identity_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_identity(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no identity line"):
        read_identity(empty)


def test_course_identity_file_has_a_line():
    line = read_identity()
    assert line and not line.startswith("#")


def test_identity_becomes_the_system_message(tiny_llama):
    model, tokenizer = tiny_llama
    assistant = Assistant(model, tokenizer, identity="You are Testy.")
    conversation = assistant.with_identity([{"role": "user", "content": "Hi"}])
    assert conversation[0] == {"role": "system", "content": "You are Testy."}
    prompt = render_prompts(tokenizer, [conversation])[0]
    assert prompt.index("You are Testy.") < prompt.index("Hi")
    assert prompt.endswith("<|im_start|>assistant\n")
    # A conversation that brings its own system message keeps it.
    own = [{"role": "system", "content": "Other."}, {"role": "user", "content": "Hi"}]
    assert assistant.with_identity(own) == own
    # identity=True reads the course's file.
    assert Assistant(model, tokenizer, identity=True).identity == read_identity()


def test_batched_replies_match_one_at_a_time_and_keep_order(tiny_llama):
    model, tokenizer = tiny_llama
    conversations = [
        [{"role": "user", "content": text}]
        for text in ["Hi", "What is the capital of France, the country in Europe?", "Name a colour", "Why?"]
    ]
    batched = generate_replies(model, tokenizer, conversations, max_new_tokens=6, batch_size=3)
    single = [generate_replies(model, tokenizer, [c], max_new_tokens=6, batch_size=1)[0] for c in conversations]
    assert batched == single
    assert len(set(batched)) > 1  # different prompts, different replies: the order is really checked
    assert tokenizer.padding_side == "left"


def test_chat_keeps_a_multi_turn_history(tiny_llama):
    model, tokenizer = tiny_llama
    assistant = Assistant(model, tokenizer, identity="You are Testy.", max_new_tokens=4)
    first = assistant.chat("Hello there")
    second = assistant.chat("And then?")
    assert [m["role"] for m in assistant.history] == ["user", "assistant", "user", "assistant"]
    assert assistant.history[1]["content"] == first and assistant.history[3]["content"] == second
    # The second turn was answered with the first turn in its prompt.
    expected = generate_replies(
        model, tokenizer, [assistant.with_identity(assistant.history[:3])], max_new_tokens=4
    )[0]
    assert second == expected
    assistant.reset()
    assert assistant.history == []


def test_ask_returns_a_string_for_one_question_and_a_list_for_many(tiny_llama):
    model, tokenizer = tiny_llama
    assistant = Assistant(model, tokenizer, max_new_tokens=3)
    assert isinstance(assistant.ask("Hi"), str)
    answers = assistant.ask(["Hi", "Bye"])
    assert isinstance(answers, list) and len(answers) == 2


def test_sampling_is_repeatable_with_the_same_seed(tiny_llama):
    model, tokenizer = tiny_llama
    conversation = [[{"role": "user", "content": "Tell me something"}]]
    seed_everything(3)
    first = generate_replies(model, tokenizer, conversation, max_new_tokens=8, do_sample=True)
    seed_everything(3)
    again = generate_replies(model, tokenizer, conversation, max_new_tokens=8, do_sample=True)
    assert first == again


def test_no_chat_template_gives_a_clear_error():
    model, tokenizer = load_lm("tiny-opt")
    with pytest.raises(ValueError, match="no chat template"):
        Assistant(model, tokenizer)


def test_malformed_conversations_give_clear_errors(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(TypeError, match="list of messages"):
        generate_replies(model, tokenizer, ["just a string"])
    with pytest.raises(ValueError, match="role 'robot'"):
        generate_replies(model, tokenizer, [[{"role": "robot", "content": "hi"}]])
    with pytest.raises(TypeError, match="list of conversations"):
        Assistant(model, tokenizer).reply("Hi")
