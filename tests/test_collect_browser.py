"""End to end in Chromium: draw a writer's digits, correct the page's mistakes ("Wrong? It was a _"),
fine-tune on the saved corrections, serve the result, and check it reads that writer better.

The writer is benchmarks/writer_style.py's (slanted, slashed 0, crossed 7, open 4, flagged 1, ...); its
strokes are drawn with the mouse on the page's canvas. The base model is the tests' small MLP.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from conftest import REPO, cli_env, run_cli
from test_serve_browser import ARGS, CHROMIUM, draw

sys.path.insert(0, str(REPO / "benchmarks"))
from serving import running_server  # noqa: E402
from writer_style import digit_strokes  # noqa: E402

pytestmark = pytest.mark.slow

# The page's pen is thinner than this writer's felt pen; the digits fill the middle 60% of the pad.
MARGIN, SPAN = 0.2, 0.6


def writer_digits(seed: int, per_digit: int) -> list[tuple[int, list[list[tuple[float, float]]]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(per_digit):
        for digit in range(10):
            strokes = [[(MARGIN + SPAN * float(x), MARGIN + SPAN * float(y)) for x, y in s[::2]]
                       for s in digit_strokes(digit, rng)]
            out.append((digit, strokes))
    return out


def final_prediction(page, timeout: float = 60.0) -> int:
    """The digit the page shows once it shows the answer for the whole drawing.

    The page predicts while drawing, too; the answer for the finished drawing is the one the server gives
    for the PNG the page would send now, so wait until the page shows that one and nothing is pending.
    """
    expected = page.evaluate("""async () => {
        const r = await fetch('/api/predict', {method: 'POST', headers: {'Content-Type': 'image/png'},
                                               body: await window.mnistrecDrawingPng()});
        return (await r.json()).digit;
    }""")
    deadline = time.monotonic() + timeout
    while page.locator("body[data-busy]").count() or page.locator("#digit").text_content() != str(expected):
        assert time.monotonic() < deadline, "the page never showed the prediction of the finished drawing"
        time.sleep(0.05)
    return int(expected)


def read_all(page, digits) -> int:
    right = 0
    for digit, strokes in digits:
        page.locator("#clear").click()
        draw(page, strokes)
        right += final_prediction(page) == digit
    return right


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 900, "height": 820}, reduced_motion="reduce")
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    return context, page, errors


def test_draw_correct_finetune_and_the_served_model_reads_the_style(browser, mlp_checkpoint, data_dir, tmp_path):
    collect = tmp_path / "corrections"
    test_digits, train_digits = writer_digits(seed=101, per_digit=2), writer_digits(seed=100, per_digit=3)

    with running_server(mlp_checkpoint, tmp_path / "serve.log", env=cli_env(), start_timeout=120,
                        args=["--collect", str(collect)]) as (url, _):
        context, page, errors = open_page(browser, url)
        before = read_all(page, test_digits)
        corrected = 0
        for digit, strokes in train_digits:
            page.locator("#clear").click()
            draw(page, strokes)
            shown = final_prediction(page)
            assert page.locator("#correct").is_visible() and page.get_by_text("Wrong? It was a").is_visible()
            if shown != digit:
                page.locator(f"#correct-digits button[data-digit='{digit}']").click()
                corrected += 1
                page.locator(f"body[data-corrections='{corrected}']").wait_for(state="attached", timeout=30_000)
                assert f"Saved as a {digit}" in page.locator("#correct-status").text_content()
        assert not errors, errors
        context.close()
    saved = sorted(p.relative_to(collect).parts[0] for p in collect.rglob("*.png"))
    assert corrected >= 3 and len(saved) == corrected, (corrected, saved)
    assert before < len(test_digits), "the base model already reads this writer perfectly: nothing to learn"

    run = tmp_path / "run"
    tuned = run_cli("finetune", "--images", collect, "-c", mlp_checkpoint, "--out", run, "--threads", "1",
                    "--data-dir", data_dir)
    assert tuned.returncode == 0, tuned.stderr

    with running_server(run / "model.pth", tmp_path / "serve2.log", env=cli_env(), start_timeout=120) as (url, _):
        context, page, errors = open_page(browser, url)
        after = read_all(page, test_digits)
        assert page.locator("#correct").is_hidden()  # collecting is off on this server
        assert not errors, errors
        context.close()
    print(f"writer's test digits read right: {before}/{len(test_digits)} before, {after} after "
          f"fine-tuning on {corrected} corrections")
    assert after > before
