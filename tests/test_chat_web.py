"""Tests of the web chat: a real Gradio server on 127.0.0.1, queried over HTTP with
gradio_client and, when Debian's chromium is installed, in a headless browser.

The server serves tiny-llama (greedy, short replies) and one saved tiny delta; it is started
once for the module on a free local port and shut down at the end.
"""

import os
import shutil
import socket
import urllib.request

import pytest

from companion.chat import Assistant, open_model
from companion.chat.web import HOST, ModelShelf, build_app, launch, model_choices
from test_chat import save_tiny_delta

gradio_client = pytest.importorskip(
    "gradio_client", reason="the web extra is not installed: pip install -e '.[web]' (make setup does it)"
)

OPTIONS = dict(identity="You are Testy.", max_new_tokens=6, repetition_penalty=1.3, batch_size=1)
BASE = "base model (tiny-llama)"
DELTA = "delta: ch1/lora"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900")
TIMEOUT = 60  # seconds for any one step against the server or the browser


def make_assistant(model, tokenizer):
    return Assistant(model, tokenizer, **OPTIONS)


def expected_reply(delta, *turns):
    """What ``delta`` (None: the base model) replies after ``turns`` (user, assistant, ..., user)."""
    model, tokenizer, _ = open_model(delta, "tiny-llama")
    roles = ["user", "assistant"] * len(turns)
    return make_assistant(model, tokenizer).reply([[{"role": r, "content": t} for r, t in zip(roles, turns)]])[0]


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    root = tmp_path_factory.mktemp("deltas")
    save_tiny_delta(root / "ch1" / "lora")
    return root


@pytest.fixture(scope="module")
def server(deltas):
    """The web chat's address; the server stops when the module's tests are done."""
    choices = model_choices("tiny-llama", deltas)
    app = build_app(ModelShelf(choices, make_assistant, base_model="tiny-llama"))
    with socket.socket() as probe:  # a free loopback port
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    url = launch(app, port, block=False)
    try:
        yield url
    finally:
        app.close()
    with pytest.raises(OSError):  # really shut down
        urllib.request.urlopen(url, timeout=5)


def test_dropdown_lists_the_base_model_and_saved_deltas(deltas):
    choices = model_choices("tiny-llama", deltas)
    assert list(choices) == [BASE, DELTA]
    assert choices[BASE] is None and choices[DELTA] == deltas / "ch1" / "lora"


def test_web_chat_answers_over_http(server, deltas):
    assert server.startswith(f"http://{HOST}:")
    client = gradio_client.Client(server, verbose=False, download_files=False)
    base_job = client.submit("Hello there", BASE, api_name="/chat")
    base_reply = base_job.result(timeout=TIMEOUT)
    assert base_reply and base_reply == expected_reply(None, "Hello there")
    streamed = base_job.outputs()
    assert len(streamed) > 1 and streamed[-1] == base_reply  # the reply arrived in pieces
    # The client's session keeps the conversation: the second turn goes to the delta picked
    # in the dropdown, with the first turn as its history.
    delta_reply = client.submit("And then?", DELTA, api_name="/chat").result(timeout=TIMEOUT)
    delta = deltas / "ch1" / "lora"
    assert delta_reply == expected_reply(delta, "Hello there", base_reply, "And then?")
    assert delta_reply != expected_reply(None, "Hello there", base_reply, "And then?")  # really switched
    assert delta_reply != expected_reply(delta, "And then?")  # really with the history


def test_web_chat_in_a_headless_browser(server, tmp_path, monkeypatch):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        message = ("Debian's chromium is not installed: apt-get install -y chromium chromium-driver "
                   "(make setup does it when run as root with apt)")
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the browser test")
        pytest.skip(message)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'profile'}",):
        options.add_argument(flag)
    # Before the page asks: building a tiny model seeds torch's global generator, so two
    # builds at once (here and in the server's thread) could get each other's numbers.
    expected = expected_reply(None, "Hello there")
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        browser.set_page_load_timeout(TIMEOUT)
        browser.get(server)
        wait = WebDriverWait(browser, TIMEOUT)
        box = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "textarea"))
        assert browser.title == "Chat with what you tuned"
        box.send_keys("Hello there")
        sent = WebDriverWait(browser, 5)
        for _ in range(TIMEOUT // 5):  # the page may still be wiring up its handlers: press Enter again
            if box.get_attribute("value").strip():  # (only while the message is still in the box)
                box.send_keys(Keys.ENTER)
            try:
                sent.until(lambda page: page.find_elements(By.CSS_SELECTOR, '[data-testid="user"]'))
                break
            except TimeoutException:
                continue
        assert browser.find_element(By.CSS_SELECTOR, '[data-testid="user"]').text.strip() == "Hello there"
        def bot_texts(page):
            return [e.text.strip() for e in page.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')]

        try:
            wait.until(lambda page: expected in bot_texts(page))
        except TimeoutException:
            browser.save_screenshot(str(tmp_path / "web_chat_timeout.png"))
            page_text = browser.find_element(By.TAG_NAME, "body").text
            pytest.fail(f"no reply {expected!r} in the page after {TIMEOUT} s; it shows {bot_texts(browser)!r}; "
                        f"page text: {page_text!r} (screenshot: {tmp_path / 'web_chat_timeout.png'})")
        assert bot_texts(browser) == [expected]
        shot = tmp_path / "web_chat.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
    finally:
        browser.quit()
