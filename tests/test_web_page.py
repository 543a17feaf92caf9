"""The page in a real browser: Debian's Chromium driven by Playwright, against `llmlab serve`.

What the page shows is checked against the JSON API of the same server (tests/test_web.py checks
the API against the commands and independent references): the numbers on the page are the
API's numbers, formatted, and each drawing has one mark per value.

Chromium is a system package (`apt-get install chromium`); `.ci/run` installs it. Elsewhere,
without it, these tests are skipped with that instruction; under CI they fail instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from tests.conftest import serving  # noqa: E402

# An answer is awaited up to 30 s, not Playwright's 5: on a busy 2-core machine a generation took
# longer. A passing expectation returns as soon as it holds, so only failures wait the whole time.
expect.set_options(timeout=30_000)

TEXT = "def f5(x, y):\n    return x - y\n"


@pytest.fixture(scope="module")
def server(trained_run: Path) -> Iterator[str]:
    """`llmlab serve RUN --port 0` in a subprocess; yields its URL."""
    with serving(trained_run) as url:
        yield url


def heat(x: float, top: float) -> str:
    """app.js's colour scale, white at 0 to rgb(214, 48, 39) at `top`, as the browser reports it."""
    t = min(1.0, max(0.0, x / top)) if top > 0 else 0.0
    r, g, b = (math.floor(a + (c - a) * t + 0.5) for a, c in ((255, 214), (255, 48), (255, 39)))
    return f"rgb({r}, {g}, {b})"


def api(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path.lstrip("/"), data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    assert CHROMIUM is not None, "CI needs Debian's chromium: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    expect(page.locator("#run-summary")).to_contain_text("parameters")
    yield page
    page.close()
    assert errors == [], errors  # no script error on the way


def test_header_names_the_run_and_its_size(page, server, trained_run):
    info = api(server, "/api/run")
    assert page.inner_text("#run-name") == trained_run.name
    summary = page.inner_text("#run-summary")
    assert f"{info['params']:,} parameters" in summary and f"context {info['model']['block_size']}" in summary


def test_score_colours_every_token_and_prints_the_apis_totals(page, server):
    page.fill("#score-text", TEXT)
    page.click("#score-form button")
    expect(page.locator("#score-totals tr")).to_have_count(7)
    r = api(server, "/api/score", {"text": TEXT})
    spans = page.locator("#score-tokens span.token")
    assert spans.count() == len(r["tokens"])
    assert page.inner_text("#score-tokens") == TEXT  # every character, in order
    values = [float(v) for v in spans.evaluate_all("els => els.slice(1).map(e => e.dataset.value)")]
    assert values == pytest.approx([t["entropy"] for t in r["tokens"][1:]])
    top = max(t["entropy"] for t in r["tokens"][1:])
    colours = spans.evaluate_all("els => els.slice(1).map(e => e.style.backgroundColor)")
    assert colours == [heat(t["entropy"], top) for t in r["tokens"][1:]]  # the colour is the entropy
    for i in (1, len(r["tokens"]) // 2):  # the hover text lists the alternatives and their p
        title = spans.nth(i).get_attribute("title")
        assert all(f"{json.dumps(a['text'])} {a['prob']:.4f}" in title for a in r["tokens"][i]["alternatives"])
    cells = "rows => rows.map(r => [r.cells[0].innerText, r.cells[1].innerText])"
    rows = dict(page.locator("#score-totals tr").evaluate_all(cells))
    assert rows["perplexity"] == f"{r['totals']['perplexity']:.3f}"
    assert rows["cross-entropy"].startswith(f"{r['totals']['mean_surprisal']:.4f} nats/token")
    worst = spans.nth(r["totals"]["max_entropy_at"])  # the darkest token says so on hover
    assert f"entropy {r['tokens'][r['totals']['max_entropy_at']]['entropy']:.3f}" in worst.get_attribute("title")


def test_colour_by_surprisal_recolours_the_same_answer(page, server):
    page.fill("#score-text", TEXT)
    page.click("#score-form button")
    expect(page.locator("#score-totals tr")).to_have_count(7)
    page.select_option("#score-by", "surprisal")
    r = api(server, "/api/score", {"text": TEXT})
    spans = page.locator("#score-tokens span.token")
    values = [float(v) for v in spans.evaluate_all("els => els.slice(1).map(e => e.dataset.value)")]
    assert values == pytest.approx([t["surprisal"] for t in r["tokens"][1:]])
    top = max(t["surprisal"] for t in r["tokens"][1:])
    colours = spans.evaluate_all("els => els.slice(1).map(e => e.style.backgroundColor)")
    assert colours == [heat(t["surprisal"], top) for t in r["tokens"][1:]]
    assert "nats of surprisal" in page.inner_text("#score-legend")


def test_bad_input_shows_the_servers_one_line_error_in_its_own_tab(page):
    score_error, generate_error = 'p.error[data-for="score-form"]', 'p.error[data-for="generate-form"]'
    page.fill("#score-text", TEXT)
    page.click("#score-form button")  # an answer on screen
    expect(page.locator("#score-totals tr")).to_have_count(7)
    page.fill("#score-text", "d")
    page.click("#score-form button")
    expect(page.locator(score_error)).to_be_visible()
    assert "single token" in page.inner_text(score_error)
    assert page.locator("#score-tokens span").count() == 0 and page.locator("#score-totals tr").count() == 0
    page.fill("#score-temperature", "1e400")  # Infinity in JavaScript: refused before it is sent as null
    page.click("#score-form button")
    expect(page.locator(score_error)).to_have_text("temperature: not a finite number")
    page.click("button[data-tab=generate]")  # the entropy tab's error stays there, out of sight
    expect(page.locator(score_error)).to_be_hidden()
    expect(page.locator(generate_error)).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    page.fill("#generate-temperature", "-1")
    page.click("#generate-form button")
    expect(page.locator(generate_error)).to_contain_text("temperature must be a finite number >= 0")
    assert page.locator("#generate-output span").count() == 0  # not even the prompt beside the error
    page.fill("#generate-temperature", "")  # an empty field is not silently 0
    page.click("#generate-form button")
    expect(page.locator(generate_error)).to_contain_text("temperature: Input should be a valid number")
    page.fill("#generate-temperature", "1")
    page.fill("#generate-seed", str(2**63 - 1))  # JavaScript's numbers would round it to 2**63
    page.click("#generate-form button")
    expect(page.locator(generate_error)).to_contain_text("seed: the page sends integers up to 2^53 − 1 exactly")
    page.fill("#generate-seed", "1")
    page.click("#generate-form button")  # a good request clears its tab's error
    expect(page.locator("#generate-figures tr")).to_have_count(2)
    expect(page.locator(generate_error)).to_be_hidden()
    page.click("button[data-tab=entropy]")
    expect(page.locator(score_error)).to_have_text("temperature: not a finite number")


def test_rejection_tab_draws_p_the_accepted_draws_and_the_envelope(page, server):
    page.click("button[data-tab=rejection]")
    page.fill("#rejection-prompt", "return x")
    page.fill("#rejection-samples", "3000")
    page.click("#rejection-form button")
    expect(page.locator("#rejection-figures tr")).to_have_count(3)
    r = api(server, "/api/rejection", {"prompt": "return x", "samples": 3000})
    svg = page.locator("#rejection-svg")
    assert [float(v) for v in svg.locator("rect.p").evaluate_all("els => els.map(e => e.dataset.value)")] == (
        pytest.approx([t["p"] for t in r["tokens"]]))  # fmt: skip
    dots = svg.locator("circle.frequency").evaluate_all("els => els.map(e => e.dataset.value)")
    assert [float(v) for v in dots] == pytest.approx([t["frequency"] for t in r["tokens"]])
    assert svg.locator("line.envelope").count() == len(r["tokens"])
    figures = page.inner_text("#rejection-figures")
    assert f"{r['acceptance_rate']:.4f} measured ({r['accepted']:,} of {r['proposed']:,} proposals)" in figures
    assert f"1/M = {r['expected_acceptance']:.4f} expected" in figures


def test_generate_streams_the_new_tokens_then_colours_each(page, server):
    posted: list[str] = []
    page.on("request", lambda request: posted.append(request.url) if request.method == "POST" else None)
    page.click("button[data-tab=generate]")
    page.fill("#generate-prompt", "def f1")
    page.fill("#generate-max", "20")
    page.fill("#generate-temperature", "0")
    page.click("#generate-form button")
    expect(page.locator("#generate-figures tr")).to_have_count(2)
    assert posted == [server.rstrip("/") + "/api/generate/stream"]
    assert page.locator("#generate-output span.pending").count() == 0  # the last line redrew them all
    r = api(server, "/api/generate", {"prompt": "def f1", "max_new_tokens": 20, "temperature": 0, "seed": 1337})
    assert page.inner_text("#generate-output") == "def f1" + r["text"]
    new = page.locator("#generate-output span.token:not(.context)")
    assert new.count() == 20
    assert [float(v) for v in new.evaluate_all("els => els.map(e => e.dataset.value)")] == pytest.approx(r["entropies"])


def test_leaving_a_page_mid_stream_frees_the_model(browser, server):
    """A real server whose reader goes away mid-generation answers the next page at once (with
    the lock held across the stream, /api/run would wait for the garbage collector)."""
    first = browser.new_page()
    first.goto(server)
    first.click("button[data-tab=generate]")
    first.fill("#generate-max", "1000")
    first.click("#generate-form button")
    expect(first.locator("#generate-output span.pending").first).to_be_visible()
    first.close()
    second = browser.new_page()
    second.goto(server)
    expect(second.locator("#run-summary")).to_contain_text("parameters")
    second.close()


def test_attention_draws_every_head_masked_above_the_diagonal(page, server):
    page.click("button[data-tab=attention]")
    page.fill("#attention-prompt", "return x")
    page.select_option("#attention-layer", "1")
    page.click("#attention-form button")
    n_heads = api(server, "/api/run")["model"]["n_heads"]
    heads = page.locator("#attention-heads figure")
    expect(heads).to_have_count(n_heads)
    r = api(server, "/api/attention", {"prompt": "return x", "layer": 1})
    S = len(r["tokens"])
    for h in range(n_heads):
        assert f"mean row entropy {r['mean_entropy'][h]:.3f} nats" in heads.nth(h).inner_text()
        cells = heads.nth(h).locator("rect.cell")
        assert cells.count() == S * S
        values = [float(v) for v in cells.evaluate_all("els => els.map(e => e.dataset.value)")]
        assert values == pytest.approx([p for row in r["pattern"][h] for p in row])
        assert all(values[i * S + j] == 0 for i in range(S) for j in range(i + 1, S))


def test_shapes_tab_lists_every_traced_tensor(page, server):
    page.click("button[data-tab=shapes]")
    page.fill("#shapes-prompt", "def")
    page.click("#shapes-form button")
    trace = api(server, "/api/trace", {"prompt": "def"})
    expect(page.locator("#shapes-rows tr")).to_have_count(len(trace["rows"]) + 1)  # + the header
    assert "every tensor matches its letters" in page.inner_text("#shapes-letters")
    first = page.locator("#shapes-rows tr").nth(1).locator("td")
    row = trace["rows"][0]
    assert first.nth(0).inner_text() == row["name"]
    assert first.nth(1).inner_text() == f"[{', '.join(row['letters'])}] = [{', '.join(map(str, row['shape']))}]"


def test_count_tab_prints_the_apis_counts(page, server):
    page.click("button[data-tab=count]")
    expect(page.locator("#count-output table")).to_have_count(3)
    count = api(server, "/api/count")
    text = page.inner_text("#count-output")
    assert f"{count['flops']['forward']['exact']:,} exact" in text and f"{count['params']['total']:,}" in text


def test_knowledge_tab_draws_the_indirect_effects_and_the_memories(page, server):
    page.click("button[data-tab=knowledge]")
    fact = {"prompt": "return x {} y", "subject": "-", "target": "*"}  # a text input holds no newline
    page.fill("#knowledge-prompt", fact["prompt"])
    page.fill("#knowledge-subject", fact["subject"])
    page.fill("#knowledge-target", fact["target"])
    page.click("#knowledge-form button")
    located = api(server, "/api/locate", fact)
    expect(page.locator("#knowledge-maps figure")).to_have_count(len(located["restored"]))
    for i, (kind, effect) in enumerate(located["effects"].items()):
        cells = page.locator("#knowledge-maps figure").nth(i).locator("rect.cell")
        values = [float(v) for v in cells.evaluate_all("els => els.map(e => e.dataset.value)")]
        assert values == pytest.approx([x for row in effect for x in row]), kind
    assert f"clean {located['p_clean']:.4f}" in page.inner_text("#knowledge-figures")

    page.fill("#neurons-prompt", "return x")
    page.click("#neurons-form button")
    memories = api(server, "/api/neurons", {"prompt": "return x"})
    expect(page.locator("#neurons-rows tr")).to_have_count(sum(map(len, memories["layers"])) + 1)
    first = memories["layers"][0][0]
    cells = page.locator("#neurons-rows tr").nth(1).locator("td")
    assert cells.nth(1).inner_text() == str(first["neuron"])
    assert cells.nth(2).inner_text() == f"{first['activation']:.3f}"


def test_knowledge_tab_edits_a_fact_and_shows_the_model_before_and_after(page, server):
    """Reference: the API's answer for the same edit (each request edits, scores and undoes)."""
    page.click("button[data-tab=knowledge]")
    fact = {"prompt": "return x {} y", "subject": "-", "target": "+"}
    page.fill("#edit-prompt", fact["prompt"])
    page.fill("#edit-subject", fact["subject"])
    page.fill("#edit-target", fact["target"])
    page.select_option("#edit-method", "rome")
    page.select_option("#edit-site", "answer")
    page.click("#edit-form button")
    expect(page.locator("#edit-texts p")).to_have_count(2)
    edited = api(server, "/api/edit", fact | {"method": "rome", "site": "answer"})
    figures = page.inner_text("#edit-figures")
    assert f"{edited['p_target_before']:.4f} → {edited['p_target_after']:.4f}" in figures
    assert f"reliability\t{100 * edited['reliability']:.1f}%" in figures
    assert page.inner_text("#edit-texts p[data-when=before]") == "before: " + edited["text"] + edited["before"]
    assert page.inner_text("#edit-texts p[data-when=after]") == "after: " + edited["text"] + edited["after"]
    assert edited["after"] != edited["before"]


def test_training_tab_draws_every_step_and_evaluation(page, server):
    page.click("button[data-tab=training]")
    info = api(server, "/api/run")
    assert page.locator("#training-svg circle.val").count() == len(info["metrics"]["val_loss"])
    assert page.locator("#training-svg path.train").get_attribute("d").count("L") == len(info["metrics"]["step"]) - 1
    m = info["metrics"]
    assert f"{m['best_val_loss']:.4f} nats/token, perplexity {m['best_val_perplexity']:.3f}" in page.inner_text(
        "#training-figures"
    )


def test_training_tab_names_the_damaged_lines_of_metrics_csv(browser, trained_run, tmp_path):
    """A hand-damaged metrics.csv: the curve of what parses, and the lines left out, as the API names them."""
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(trained_run, run)
    with open(run / "metrics.csv", "ab") as f:
        f.write(b"8,0.0001,1.4\n\xff\xfe,1,1,,1,1\n" + b",,,,,\n" * 10)  # 12 damaged lines
    with serving(run) as url:
        info = api(url, "/api/run")
        page = browser.new_page()
        try:
            page.goto(url)
            page.click("button[data-tab=training]")
            lines = info["metrics"]["damaged_lines"]
            assert len(lines) == 12  # the page names the first 10
            expect(page.locator("#training-figures")).to_contain_text(
                f"metrics.csv lines {', '.join(map(str, lines[:10]))} … (12 in all) do not parse: left out"
            )
            d = page.locator("#training-svg path.train").get_attribute("d")
            assert d.count("L") == len(info["metrics"]["step"]) - 1
        finally:
            page.close()
