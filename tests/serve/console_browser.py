"""The web console's test rig: Debian's chromium driven by Playwright, against real `genforge serve`
processes, and the screenshots the README shows (docs/screenshots/)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
KEY = "console-test-key"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 860}


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """One headless chromium per test module. Skipped where no chromium is installed (`make test`
    apt-installs it as root); CI sets GENFORGE_REQUIRE_BROWSER=1, so there a missing browser fails.

    Module scope, not session: Playwright's sync API keeps an asyncio loop running in the main thread
    while it is open, and later modules' `asyncio.run` would find it and refuse to start."""
    sync_api = pytest.importorskip("playwright.sync_api")
    path = chromium_path()
    if path is None:
        if os.environ.get("GENFORGE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install chromium), and GENFORGE_REQUIRE_BROWSER is set")
        pytest.skip("chromium is not installed (make test installs Debian's package when run as root)")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI and these machines run as root, where chromium refuses its sandbox
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def open_console(browser, url: str, *, key: str | None = KEY, viewport: dict = DESKTOP, view: str = "",
                 ready: bool = True):
    """A fresh page (its own sessionStorage and localStorage) on the console, the key entered when
    the server asks for one. JavaScript errors fail the test that reads `page.errors`."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(f"{url}/#{view}" if view else url + "/")
    if key is not None:
        page.wait_for_selector("#key-dialog[open]", timeout=20_000)
        page.fill("#key-input", key)
        page.click("#key-form button[type=submit]")
    if ready:
        page.wait_for_selector("#loading", state="hidden", timeout=20_000)
    return page


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    tmp = path.with_suffix(".tmp.png")
    page.screenshot(path=str(tmp), full_page=True)
    tmp.replace(path)
    return path


def slow_lm_folder(root: Path, tok) -> Path:
    """A random Llama that never ends its answer by itself, served from a plain HF folder: streams
    long enough (thousands of tokens) to stop, or to kill the server, in the middle of one.

    The end-of-sequence row of the output layer is zero and the rest is scaled up, so its logit
    (0) always sits far below the best of the others."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
        model.lm_head.weight[tok.eos_token_id] = 0
    folder = root / "slow-lm"
    model.save_pretrained(folder)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(folder)
    return folder
