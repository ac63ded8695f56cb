"""The chat page at / in headless Chromium (Debian's chromium driven by Playwright): a typed
message streams a reply, chunk by chunk, equal to what the API answers for the same request."""

from __future__ import annotations

import shutil

import openai
import pytest
from test_serve_utils import ServerThread, make_checkpoint

from lmforge.serve import ServeConfig

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed (apt-get install -y chromium)")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir, adapter_dir = make_checkpoint(tmp_path_factory.mktemp("page"))
    with ServerThread(ServeConfig(model=str(model_dir), adapters={"lora": str(adapter_dir)}, api_key="k3y")) as s:
        yield s


def test_typed_message_streams_a_reply(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('could not list models')")
            page.fill("#api-key", "k3y")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length === 2")
            page.select_option("#model", "lora")
            page.fill("#max-tokens", "24")
            page.fill("#temperature", "0")
            page.fill("#input", "Hello there, how are you?")
            page.press("#input", "Enter")
            reply = page.wait_for_selector(".msg.assistant[data-finish]", timeout=30_000)
            text, chunks = reply.inner_text(), int(reply.get_attribute("data-chunks"))
            assert reply.get_attribute("data-finish") == "length"
            assert page.inner_text(".msg.user") == "Hello there, how are you?"
            assert page.inner_text("#status") == "done"
        finally:
            browser.close()
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y", max_retries=0)
    expected = (
        api.chat.completions.create(
            model="lora",
            messages=[{"role": "user", "content": "Hello there, how are you?"}],
            max_tokens=24,
            temperature=0,
        )
        .choices[0]
        .message.content
    )
    assert chunks > 1  # it streamed, not one block at the end
    # innerText normalises some whitespace; compare what the browser shows with the API's text
    assert text.split() == expected.split()
