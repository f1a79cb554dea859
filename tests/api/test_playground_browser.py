"""The playground (GET /) in a real browser: Debian's Chromium, headless, driven by Playwright's
Python API (never a browser Playwright downloads). Against the session's default-model server
(tests/api/conftest.py `server`), and a fake-engine server with --api-key for the key prompt.

Screenshots are kept in tests/artifacts/playground/ (ignored by git), one per step worth seeing.
Without /usr/bin/chromium (or without playwright) the tests are skipped, saying which is missing;
.ci/run installs Chromium.

No assertion is about time: every wait is a generous deadline for a busy two-core machine. The
page's CSP forbids eval, so the waits poll the DOM from Python instead of Playwright's
wait_for_function.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from server import API_KEY, CLIENT_TIMEOUT_S, ServerProcess, metric

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

HERE = Path(__file__).parent
ARTIFACTS = HERE.parent / "artifacts" / "playground"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_S = CLIENT_TIMEOUT_S
ASSISTANT = '#messages li[data-role="assistant"]'
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground screenshots: {ARTIFACTS}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser context (no saved conversation) on the default-model server's playground."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(WAIT_S * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(server.url + "/")
    page.wait_for_selector("#model option", state="attached")
    yield page
    context.close()
    assert errors == [], errors  # no script error and no CSP violation on the way


def until(condition, what: str, timeout_s: float = WAIT_S):
    """Polls `condition()` until it is truthy and returns it; fails naming `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"waited {timeout_s:.0f} s for {what}")


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def answer_text(page) -> str:
    return page.inner_text(f"{ASSISTANT} .body")


def streaming(page) -> bool:
    return page.locator(".msg.streaming").count() > 0


def set_params(page, **params) -> None:
    for name, value in params.items():
        page.fill(f'[data-param="{name}"]', str(value))


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def finished_answer(page) -> str:
    page.wait_for_selector(f"{ASSISTANT}:not(.streaming)")
    return answer_text(page)


def test_chat_streams_token_by_token_with_probabilities_and_figures(page, server):
    set_params(page, temperature=0, max_tokens=64)
    send(page, "Write a short poem about the sea.")
    lengths = []
    until(lambda: streaming(page) or page.locator(ASSISTANT).count(), "the answer to start")
    while streaming(page):  # the text seen at successive polls while the answer streams
        text = page.locator(f"{ASSISTANT} .body").inner_text()
        if text and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        time.sleep(0.01)
    shown = finished_answer(page)
    assert len(lengths) >= 3 and lengths == sorted(lengths), lengths  # it grew, step by step
    shot(page, "1-streamed-answer")

    # the page's exported request, sent again without streaming, gives the same greedy text
    page.click("#export-json")
    body = json.loads(page.input_value("#export-text"))
    page.click("#export-dialog button[type=submit]")
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    assert (body["temperature"], body["max_tokens"], body["logprobs"], body["top_logprobs"]) == (0, 64, True, 5)
    replay = httpx.post(server.url + "/v1/chat/completions", timeout=CLIENT_TIMEOUT_S,
                        json={**body, "messages": body["messages"][:1]}).json()
    assert shown == replay["choices"][0]["message"]["content"]

    # one coloured span per token; hovering shows its probability and alternatives
    tokens = page.locator(f"{ASSISTANT} .body .tok")
    assert tokens.count() >= 2 and "".join(tokens.all_inner_texts()) == shown
    tokens.nth(1).hover()
    tip = page.locator("#tip")
    assert tip.is_visible() and "logprob" in tip.inner_text() and tip.locator("tr").count() >= 2
    shot(page, "2-token-alternatives")

    figures = page.inner_text(f"{ASSISTANT} .stats")
    usage = replay["usage"]
    assert "TTFT" in figures and "tok/s" in figures
    assert f"prompt {usage['prompt_tokens']} tokens" in figures
    assert f"output {usage['completion_tokens']} tokens" in figures
    assert re.search(r"prefix cache \d+/\d+ tokens", figures), figures  # usage.prompt_tokens_details

    # the server panel reads /metrics by itself
    until(lambda: "answered" in page.inner_text('#status dd[data-name="requests"]'), "the status panel")
    assert page.locator("#status meter").count() == 1

    # the conversation survives a reload; curl export
    page.reload()
    page.wait_for_selector("#model option", state="attached")
    assert finished_answer(page) == shown
    page.click("#export-curl")
    curl = page.input_value("#export-text")
    assert curl.startswith(f"curl -sS '{server.url}/v1/chat/completions'") and "-d @- <<'JSON'" in curl
    assert json.loads(curl.split("<<'JSON'\n")[1].rsplit("\nJSON", 1)[0]) == body


def test_stop_cancels_the_request_on_the_server(page, server):
    cancelled = metric(httpx.get(server.url + "/metrics").text, "parley_request_cancelled")
    set_params(page, max_tokens=1500)
    send(page, "Tell me a very long story about a dragon and a knight.")
    until(lambda: len(page.locator(f"{ASSISTANT} .body").inner_text()) > 10, "some streamed text")
    page.click("#stop")
    until(lambda: not streaming(page), "the page to stop streaming")
    figures = page.inner_text(f"{ASSISTANT} .stats")
    assert "stopped" in figures and "finish:" not in figures
    until(lambda: metric(httpx.get(server.url + "/metrics").text, "parley_request_cancelled") == cancelled + 1,
          "the server to count the request as cancelled")
    shot(page, "3-stopped")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_json_schema_answer_parses_and_tool_calls_show(page):
    page.select_option('[data-param="format"]', "json_schema")
    page.fill('[data-param="format_value"]', json.dumps(CITY))
    set_params(page, max_tokens=80, temperature=0)
    send(page, "A city and its population, as JSON.")
    text = finished_answer(page)
    assert page.get_attribute(ASSISTANT, "data-finish") == "stop", text
    jsonschema.validate(json.loads(text), CITY)
    shot(page, "4-json-schema")

    page.fill('[data-param="format_value"]', "not json")
    send(page, "Another one.")
    assert "not valid JSON" in page.inner_text("#settings-error")  # refused in the page, nothing sent
    assert page.locator(ASSISTANT).count() == 1 and "Another one." not in page.inner_text("#messages")
    assert page.input_value("#prompt") == "Another one."  # kept for after the fix

    page.click("#new-chat")
    page.select_option('[data-param="format"]', "text")
    page.fill('[data-param="tools"]', json.dumps(WEATHER))
    page.select_option('[data-param="tool_choice"]', "required")
    page.check('[data-param="single_call"]')
    set_params(page, max_tokens=300)
    send(page, "What is the weather in Paris?")
    text = finished_answer(page)
    assert page.get_attribute(ASSISTANT, "data-finish") == "tool_calls", (text, page.inner_text(ASSISTANT))
    call = page.inner_text(f"{ASSISTANT} .calls")
    name, _, rest = call.partition("(")
    assert name == "get_weather" and "city" in json.loads(rest.rsplit(")", 1)[0])
    shot(page, "5-tool-calls")


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_in_the_tab(browser, tmp_path):
    proc = ServerProcess([sys.executable, str(HERE / "fake_server.py"), "serve", "--api-key", API_KEY],
                         tmp_path / "server.log").start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_S * 1000)
        page.goto(proc.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        shot(page, "6-api-key")
        page.fill("#key-input", "wrong")
        page.click("#key-form button")
        page.wait_for_selector("#key-dialog[open]")  # refused: asked again, saying so
        assert "refused" in page.inner_text("#key-dialog")
        page.fill("#key-input", API_KEY)
        page.click("#key-form button")
        page.wait_for_selector("#model option", state="attached")
        set_params(page, temperature=0, max_tokens=19)
        send(page, "Hi")
        assert finished_answer(page) == "The quick brown fox"  # the chat call sent the key too
        saved = context.storage_state()["origins"]
        assert API_KEY not in json.dumps(saved) and "The quick brown fox" in json.dumps(saved)  # localStorage
        page.reload()  # the same tab keeps it
        page.wait_for_selector("#model option", state="attached")
        assert not page.locator("#key-dialog[open]").count()
        other = context.new_page()  # another tab does not
        other.goto(proc.url + "/")
        other.wait_for_selector("#key-dialog[open]")
    finally:
        context.close()
        proc.stop()


def test_chromium_is_debians():
    """The browser is the system's, never one Playwright fetched."""
    assert shutil.which("chromium") == str(CHROMIUM)


def test_a_thinking_models_reasoning_folds_away_above_its_answer(browser, thinker):
    page = browser.new_page()
    page.set_default_timeout(WAIT_S * 1000)
    page.goto(thinker.url + "/")
    page.wait_for_selector("#model option", state="attached")
    set_params(page, temperature=0, max_tokens=12)
    send(page, "hi")
    finished_answer(page)
    thought = httpx.post(thinker.url + "/v1/chat/completions", timeout=CLIENT_TIMEOUT_S, json={
        "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 12,
    }).json()["choices"][0]["message"]["reasoning_content"]
    thinking = page.locator(f"{ASSISTANT} details.thinking")
    assert thinking.count() == 1 and not thinking.get_attribute("open")
    thinking.locator("summary").click()
    assert thinking.locator("div").inner_text() == thought
    shot(page, "7-thinking")
    page.close()
