"""Tests of companion.chat: identity line, batched and streamed replies, multi-turn history,
the terminal chat and its command line, saved deltas, clear errors."""

import io
import os
import subprocess
import sys
import threading

import pytest
import torch

from companion import cli
from companion.adapters import attach
from companion.chat import (
    Assistant,
    check_conversation,
    find_deltas,
    generate_replies,
    open_model,
    read_identity,
    render_prompts,
    stream_reply,
)
from companion.chat.command import main
from companion.chat.terminal import terminal_chat
from companion.config import REPO_ROOT, seed_everything
from companion.delta import save_delta
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


# --- issue 15, item 14: a message without a role ------------------------------------------------


def test_a_message_without_a_role_gives_a_clear_error(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match=r"message 0 has no 'role' \(it has 'content', 'name'\)"):
        generate_replies(model, tokenizer, [[{"content": "hi", "name": "x"}]])
    with pytest.raises(ValueError, match="message 1 has no 'content'"):
        Assistant(model, tokenizer).reply([[{"role": "user", "content": "hi"}, {"role": "assistant"}]])
    with pytest.raises(ValueError, match="has no 'role' and no 'content'"):
        check_conversation([{"name": "x"}])


# --- issue 15, item 6: identity text or identity file -------------------------------------------


def test_identity_file_is_read_and_a_file_name_as_identity_is_refused(tiny_llama, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama
    path = tmp_path / "identity.txt"
    path.write_text("# mine\nYou are Filey.\n", encoding="utf-8")
    assert Assistant(model, tokenizer, identity_file=str(path)).identity == "You are Filey."
    assert Assistant(model, tokenizer, identity_file=path).identity == "You are Filey."
    assert Assistant(model, tokenizer, identity=path).identity == "You are Filey."  # a Path is a file
    # A string naming a file used to become the system prompt itself; now it says what to do.
    with pytest.raises(ValueError, match=r"looks like a file name.*identity_file="):
        Assistant(model, tokenizer, identity=str(path))
    with pytest.raises(ValueError, match="identity_file="):
        Assistant(model, tokenizer, identity="path/to/identity.txt")  # does not exist: still a file name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "persona").write_text("You are Plain.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="identity_file='persona'"):
        Assistant(model, tokenizer, identity="persona")  # an existing file without a suffix
    with pytest.raises(ValueError, match="not both"):
        Assistant(model, tokenizer, identity="You are Testy.", identity_file=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Assistant(model, tokenizer, identity_file=tmp_path / "missing.txt")
    assert Assistant(model, tokenizer, identity="You are Testy, see notes.txt").identity.startswith("You are")


# --- streaming, the terminal chat and its command line ------------------------------------------


def test_streamed_reply_grows_to_the_batched_reply(tiny_llama):
    model, tokenizer = tiny_llama
    conversation = [{"role": "user", "content": "Tell me about rivers"}]
    pieces = list(stream_reply(model, tokenizer, conversation, max_new_tokens=10))
    assert len(pieces) > 1  # it streams, not one block at the end
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    assert pieces[-1] == generate_replies(model, tokenizer, [conversation], max_new_tokens=10)[0]


def test_closing_a_stream_early_stops_the_generation(tiny_llama):
    model, tokenizer = tiny_llama
    conversation = [{"role": "user", "content": "Tell me about rivers"}]
    steps = []
    hook = model.register_forward_hook(lambda *args: steps.append(1))
    try:
        stream = stream_reply(model, tokenizer, conversation, max_new_tokens=300)
        first = next(stream)
        stream.close()  # the web user pressed Stop
        stopped_after = len(steps)
        assert first and not any(t.name == "chat-generate" for t in threading.enumerate())
        steps.clear()
        assert len(list(stream_reply(model, tokenizer, conversation, max_new_tokens=300))[-1].split()) > 100
        assert stopped_after < len(steps) == 300  # uninterrupted, it makes all 300 steps
    finally:
        hook.remove()
    assert model.training is False
    # the model still answers normally afterwards
    again = list(stream_reply(model, tokenizer, conversation, max_new_tokens=10))
    assert again[-1] == generate_replies(model, tokenizer, [conversation], max_new_tokens=10)[0]


def test_generation_settings_are_checked_before_generating(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="top_p must be in"):
        Assistant(model, tokenizer, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_replies(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        list(stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], temperature=0))


def test_terminal_chat_keeps_history_resets_and_quits(tiny_llama):
    model, tokenizer = tiny_llama
    typed = io.StringIO("Hello there\n\nAnd then?\n/reset\n/nonsense\nHello there\n/quit\nnever read\n")
    out = io.StringIO()
    options = dict(identity="You are Testy.", max_new_tokens=5, repetition_penalty=1.5)
    assistant = Assistant(model, tokenizer, **options)
    assert terminal_chat(assistant, typed, out) == 3
    reference = Assistant(model, tokenizer, **options)
    first, second = reference.chat("Hello there"), reference.chat("And then?")
    assert first != second
    replies = [line.split("assistant> ", 1)[1] for line in out.getvalue().splitlines() if "assistant> " in line]
    assert replies == [first, second, first]  # after /reset the first answer comes back
    assert "unknown command /nonsense" in out.getvalue()
    assert typed.readline() == "never read\n"  # /quit stopped reading
    assert [m["content"] for m in assistant.history] == ["Hello there", first]


def test_chat_command_through_standard_input():
    typed = "Hello\nHow are you?\n/reset\n/quit\n"
    result = subprocess.run(
        [sys.executable, "-m", "companion.chat", "--model", "tiny-llama", "--greedy", "--max-new-tokens", "4"],
        input=typed, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env={**os.environ, "COURSE_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"chatting with tiny-llama as: {read_identity()}")
    assert result.stdout.count("assistant> ") == 2
    assert "(conversation forgotten" in result.stdout


def save_tiny_delta(folder, *, new_token: str | None = None, seed: int = 1, tokenizer_by_hand: bool = False):
    """Save a small LoRA delta on tiny-llama (with ``new_token`` and its trained row when given;
    its tokenizer goes through ``save_delta``, or ``tokenizer_by_hand`` with ``save_pretrained``).

    The LoRA matrices are set to random values, so the delta really changes the replies.
    Returns the tokenizer's id of ``new_token`` (or None) and the model with the delta.
    """
    model, tokenizer = load_lm("tiny-llama")
    knobs, token_id = {}, None
    if new_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [new_token]})
        token_id = tokenizer.convert_tokens_to_ids(new_token)
        model.resize_token_embeddings(len(tokenizer))
        knobs["trainable_token_indices"] = [token_id]
    tuned = attach(model, "lora", r=2, **knobs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    save_delta(tuned, folder, tokenizer=tokenizer if new_token and not tokenizer_by_hand else None)
    if tokenizer_by_hand:
        tokenizer.save_pretrained(folder)
    return token_id, tuned


def test_open_model_finds_deltas_at_any_depth_with_their_new_token(tmp_path):
    root = tmp_path / "deltas"
    sep_id, tuned = save_tiny_delta(root / "fast" / "ch3", new_token="<sep>")
    save_tiny_delta(root / "ch1" / "lora")
    (root / "not_a_delta").mkdir()
    assert list(find_deltas(root)) == ["ch1/lora", "fast/ch3"]
    assert find_deltas(tmp_path / "nothing_here") == {}
    model, tokenizer, label = open_model("fast/ch3", root=root)
    assert tokenizer.convert_tokens_to_ids("<sep>") == sep_id  # the extended tokenizer came along
    assert label.startswith("tiny-llama + delta")
    ids = torch.tensor([[sep_id, 5, 6]])
    # the trained <sep> row (and the LoRA matrices) are back: the same logits as before saving
    assert torch.allclose(model(ids).logits, tuned.eval()(ids).logits, atol=1e-5)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    by_path, _, _ = open_model(root / "ch1" / "lora")
    assert by_path.peft_config["default"].r == 2
    # a tokenizer saved beside the delta by hand (tokenizer.save_pretrained(folder)) is used too
    sep_id, tuned = save_tiny_delta(tmp_path / "by_hand", new_token="<sep>", tokenizer_by_hand=True, seed=2)
    model, tokenizer, _ = open_model(tmp_path / "by_hand")
    assert tokenizer.convert_tokens_to_ids("<sep>") == sep_id
    assert torch.allclose(model(ids).logits, tuned.eval()(ids).logits, atol=1e-5)


def test_chat_command_errors_are_one_line(tmp_path, capsys):
    save_tiny_delta(tmp_path / "llama_delta")
    cases = [
        (["--delta", "no_such_delta", "--deltas-dir", str(tmp_path)], "no saved delta 'no_such_delta'"),
        (["--delta", str(tmp_path / "llama_delta"), "--model", "tiny-opt"], "was made for backbone 'tiny-llama'"),
        (["--delta", str(tmp_path)], "has no course_delta.json"),
        (["--identity", str(tmp_path / "missing.txt")], "does not exist"),
        (["--top-p", "2"], "top_p must be in"),
        (["--port", "70000", "--web"], "--port must be between"),
    ]
    for argv, expected in cases:
        assert cli.run(main, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(ValueError, match="top_p"):
        cli.run(main, ["--top-p", "2", "--debug"])


def test_web_chat_without_gradio_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the web extra were not installed
    assert cli.run(main, ["--web", "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the web chat needs gradio") and "pip install -e '.[web]'" in err
