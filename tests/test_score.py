"""`llmlab score`: per-token surprisal, entropy and alternatives against PyTorch, transformers and
scipy; sliding windows; the heat-map renderers; and every bad input through the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from transformers import GPT2Config, GPT2LMHeadModel

from llmlab import score as score_lib
from llmlab.config import ModelConfig
from llmlab.data import sequential_batches
from llmlab.errors import UserError
from llmlab.hf import from_hf_model
from llmlab.model import GPT
from llmlab.run_dir import load_run
from llmlab.sampling import SamplingConfig, generate_text
from llmlab.score import (
    CSS,
    PALETTE,
    generation_json,
    plan_windows,
    render_generation,
    render_html,
    render_terminal,
    score_ids,
    score_text,
    token_pieces,
)
from llmlab.tokenizer import CharTokenizer, train_tokenizer
from tests.conftest import run_cli

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4)).eval()


# --- windows ---------------------------------------------------------------------------------


@given(n=st.integers(2, 300), context=st.integers(1, 40), data=st.data())
def test_windows_predict_every_token_once_with_at_least_context_minus_stride(n, context, data):
    stride = data.draw(st.integers(1, context))
    plan = plan_windows(n, context, stride)
    predicted = []
    for start, keep in plan:
        width = min(context, n - 1)
        assert start >= 0 and start + width <= n - 1
        for offset in range(keep, width):
            target = start + 1 + offset
            predicted.append(target)
            seen = offset + 1  # tokens start … target − 1
            assert seen >= min(target, context - stride + 1) or start == 0
    assert predicted == list(range(1, n))


def test_bad_strides_are_errors():
    for stride in (0, 17):
        with pytest.raises(UserError, match=f"between 1 and the context \\(16\\), got {stride}"):
            plan_windows(100, 16, stride)


# --- per-token figures against references ----------------------------------------------------


def test_surprisal_equals_transformers_gpt2_logits(hf_model):
    """Reference: −log_softmax of transformers.GPT2LMHeadModel's logits on the same (random) weights,
    within 1e-4; entropy: scipy.stats.entropy of their softmax."""
    ours = from_hf_model(hf_model)
    ids = torch.randint(0, 96, (33,), generator=torch.Generator().manual_seed(2)).tolist()  # 32 predictions
    sc = score_ids(ours, ids, top_k=3)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids[:-1]])).logits[0]  # [32, V]
    ref = -torch.log_softmax(logits, -1)[torch.arange(32), torch.tensor(ids[1:])]
    torch.testing.assert_close(sc.surprisal, ref, rtol=0, atol=1e-4)
    ref_h = stats.entropy(torch.softmax(logits, -1).numpy(), axis=-1)
    np.testing.assert_allclose(sc.entropy.numpy(), ref_h, atol=1e-4)
    assert sc.windows == 1


def test_sliding_windows_equal_transformers_on_each_window(hf_model):
    """With stride 1 every token t after the first S is predicted from exactly the S tokens before it.
    Reference: transformers on ids[0 : S] (causal: tokens 1 … S), then on every ids[t − S : t] (last
    position), the windows stacked as one batch."""
    ours = from_hf_model(hf_model)
    S = 32
    ids = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(3))
    sc = score_ids(ours, ids.tolist(), stride=1)
    with torch.no_grad():
        first = torch.log_softmax(hf_model(ids[None, :S]).logits[0], -1)  # [S, V]
        later = torch.log_softmax(hf_model(ids.unfold(0, S, 1)[1 : 70 - S]).logits[:, -1], -1)  # [69 − S, V]
    logp = torch.cat([first, later])  # [69, V]: row t − 1 predicts token t
    ref = -logp[torch.arange(69), ids[1:]]
    torch.testing.assert_close(sc.surprisal, ref, rtol=0, atol=1e-4)
    assert sc.windows == 1 + (69 - S)


def test_batched_windows_equal_one_window_at_a_time(monkeypatch):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=30, block_size=16, n_layers=2, n_heads=4, d_model=32)).eval()
    ids = torch.randint(0, 30, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    batched = score_ids(model, ids, temperature=0.8, top_k=4, keep_logits=True)
    monkeypatch.setattr(score_lib, "LOGITS_PER_BATCH", 1)
    alone = score_ids(model, ids, temperature=0.8, top_k=4, keep_logits=True)
    for a, b in zip(
        (batched.surprisal, batched.entropy, batched.top_probs, batched.logits),
        (alone.surprisal, alone.entropy, alone.top_probs, alone.logits),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.rank, alone.rank) and torch.equal(batched.top_ids, alone.top_ids)


def test_score_text_fields_against_softmax_of_the_model(trained_run):
    """Reference: F.cross_entropy / torch.softmax of one forward pass over the text at temperature T."""
    run = load_run(trained_run)
    text = "def f12(x, y):\n    return x"
    scored = score_text(run.model, run.tokenizer, text, temperature=0.7, top_k=3)
    ids = run.tokenizer.encode(text)
    with torch.no_grad():
        logits = run.model(torch.tensor([ids[:-1]]))[0] / 0.7  # [m, V]
    y = torch.tensor(ids[1:])
    probs = torch.softmax(logits, -1)
    assert [t.id for t in scored.tokens] == ids and scored.tokens[0].surprisal is None
    for i, t in enumerate(scored.tokens[1:]):
        assert math.isclose(t.surprisal, F.cross_entropy(logits[i], y[i]).item(), abs_tol=1e-5)
        assert math.isclose(t.prob, probs[i, y[i]].item(), rel_tol=1e-4)
        assert t.rank == int((probs[i] > probs[i, y[i]]).sum()) + 1
        assert [a.id for a in t.alternatives] == probs[i].argsort(descending=True)[:3].tolist()
        assert math.isclose(t.alternatives[0].prob, probs[i].max().item(), rel_tol=1e-5)
    totals = scored.totals()
    ce = F.cross_entropy(logits, y).item()
    assert math.isclose(totals["mean_surprisal"], ce, rel_tol=1e-5)
    assert math.isclose(totals["perplexity"], math.exp(ce), rel_tol=1e-5)
    assert math.isclose(totals["sequence_nll"], F.cross_entropy(logits, y, reduction="sum").item(), rel_tol=1e-5)
    ref_h = stats.entropy(probs.numpy(), axis=-1)
    assert math.isclose(totals["mean_entropy"], ref_h.mean(), rel_tol=1e-5)
    assert totals["max_entropy_at"] == int(ref_h.argmax()) + 1


def test_token_pieces_concatenate_to_the_text_for_char_and_byte_level_bpe():
    text = "naïve café, 日本語 😀 and ascii\n" * 3
    bpe = train_tokenizer("bpe", text, vocab_size=280)
    for tok in (CharTokenizer.train(text), bpe):
        ids = tok.encode(text)
        pieces = token_pieces(tok, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "" in token_pieces(bpe, bpe.encode("😀"))  # the emoji's first bytes wait for its last


# --- renderers -------------------------------------------------------------------------------


def test_terminal_heat_map_colours_by_value_and_keeps_the_text():
    pieces, values = ["a", "b", "c", "d"], [None, 0.0, 1.7, 3.5]
    out = render_terminal(pieces, values, "entropy")
    heat, legend = out.split("\n")
    assert ANSI.sub("", heat) == "abcd"
    assert heat.startswith("a\x1b[48;5;") and f"48;5;{PALETTE[0]};" in heat and f"48;5;{PALETTE[-1]};" in heat
    assert legend.startswith("entropy H(p), nats: ") and legend.count("\x1b[48;5;") == len(PALETTE)
    assert "0–0.5" in ANSI.sub("", legend) and "3–3.5" in ANSI.sub("", legend)
    with pytest.raises(UserError, match="colour by 'entropy' or 'surprisal', not 'rank'"):
        render_terminal(pieces, values, "rank")


def test_terminal_heat_map_marks_newline_tokens_with_a_coloured_space():
    out = render_terminal(["x", "\n", "y"], [None, 1.0, 2.0], "surprisal")
    assert ANSI.sub("", out).split("\n")[:2] == ["x ", "y"]


class Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.tips, self.external, self._tip = 0, [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tokens += attrs.get("class") == "t"
        self._tip = attrs.get("class") == "tip"
        self.external += [v for k, v in attrs.items() if k in ("src", "href") and v and "://" in v]

    def handle_data(self, data):
        if self._tip:
            self.tips.append(data)
            self._tip = False


def test_html_page_has_one_span_per_scored_token_with_its_alternatives(trained_run):
    run = load_run(trained_run)
    scored = score_text(run.model, run.tokenizer, "def f3(x, y):\n    return x + y", top_k=2)
    page = render_html(scored, "surprisal")
    parser = Spans()
    parser.feed(page)
    assert parser.tokens == len(scored.tokens) - 1 and not parser.external
    t = scored.tokens[5]
    assert f"surprisal {t.surprisal:.3f} nats" in parser.tips[4]
    assert all(f"{a.prob:6.3f}" in parser.tips[4] for a in t.alternatives)
    used = set(re.findall(r"background:(#[0-9a-f]{6})", page))
    assert used and used <= set(CSS)


def test_generation_rendering_and_json_match_the_generation(trained_run):
    run = load_run(trained_run)
    g = generate_text(run.model, run.tokenizer, "def f", 25, SamplingConfig(0.9), seed=3)
    fields = generation_json(run.tokenizer, g.token_ids, g.entropies)
    assert "".join(fields["token_texts"]) == g.text and fields["entropies"] == g.entropies
    assert math.isclose(fields["mean_entropy"], float(np.mean(g.entropies)))
    coloured = render_generation(run.tokenizer, g.prompt, g.token_ids, g.entropies)
    heat, legend = ANSI.sub("", coloured).rsplit("\n", 1)
    assert heat == "def f" + g.text.replace("\n", " \n") and legend.startswith("entropy H(p), nats:")
    plain = render_generation(run.tokenizer, g.prompt, g.token_ids, g.entropies, color=False)
    assert plain.startswith("def f" + g.text + "\n") and f"{g.entropies[-1]:.3f}" in plain.splitlines()[-1]


# --- CLI -------------------------------------------------------------------------------------


def test_cli_json_html_and_calibration(capsys, trained_run, tmp_path):
    code, out, _ = run_cli(capsys, "score", str(trained_run), "--val", "600", "--calibration", "--out",
                           str(tmp_path / "figs"), "--html", str(tmp_path / "s.html"), "--json")  # fmt: skip
    assert code == 0
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert len(result["tokens"]) == 600 and result["totals"]["scored"] == 599 and result["windows"] > 1
    assert math.isclose(result["totals"]["mean_surprisal"], np.mean([t["surprisal"] for t in result["tokens"][1:]]))
    cal, ep = result["calibration"], result["error_prediction"]
    assert cal["n_fit"] + cal["n_eval"] == 599 and 0 <= cal["ece"] <= 1 and cal["temperature"] > 0
    assert 0.5 < ep["auroc_entropy"] <= 1
    for name in ("reliability", "rejection"):
        assert (tmp_path / "figs" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "s.html").read_text().startswith("<!doctype html>")


def test_cli_long_text_is_scored_in_windows_and_prints_a_table(capsys, trained_run):
    text = "def f1(x, y):\n    return x + y * 1\n\n" * 4  # 144 characters, context 32
    code, out, _ = run_cli(capsys, "score", str(trained_run), "--text", text, "--stride", "8", "--color", "never")
    assert code == 0
    assert "windows         15 of 32 tokens, stride 8" in out
    assert out.splitlines()[0].split() == ["pos", "token", "id", "surprisal", "entropy", "p", "rank", "alternatives"]


def test_cli_colours_when_asked(capsys, trained_run):
    code, out, _ = run_cli(capsys, "score", str(trained_run), "--text", "def f1(x)", "--color", "always", "--by",
                           "surprisal")  # fmt: skip
    assert code == 0 and "\x1b[48;5;" in out and "surprisal −log p, nats:" in out


def test_cli_bad_inputs_are_one_line_exit_2_and_write_nothing(capsys, trained_run, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"def caf\xe9")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in trained_run.iterdir() if p.is_file()}
    r = str(trained_run)
    cases = [
        (["--text", ""], "the text is empty"),
        (["--text", "d"], "the text 'd' is a single token: nothing to score"),
        (["--file", str(tmp_path / "latin1.txt")], "not valid UTF-8 (byte 0xe9 at offset 7)"),
        (["--text", "def", "--temperature", "0"], "temperature must be a positive number, got 0.0"),
        (["--text", "def", "--temperature", "-2"], "temperature must be a positive number, got -2.0"),
        (["--text", "def", "--temperature", "0.001"], "scoring takes a temperature of at least 0.01, got 0.001"),
        (["--text", "def", "--stride", "0"], "stride must be between 1 and the context (32), got 0"),
        (["--text", "def", "--top-k", "-1"], "--top-k must be >= 0"),
        (["--text", "def", "--calibration"], "calibration needs at least 10 predictions"),
        (["--text", "def", "--html", str(trained_run / "x.html")], "inside the run directory"),
        (["--text", "def", "--html", str(tmp_path)], "is a directory"),
        (["--text", "def", "--html", "/proc/llmlab-x.html"], "No such file or directory: /proc/llmlab-x.html"),
        (["--val", "1"], "--val needs at least 2 tokens"),
        (["--val", "10000000"], "--val 10000000: the validation split of"),
        (["--text", "def", "--out", str(tmp_path / "figs")], "--out holds the --calibration figures"),
        (["--text", "def", "--calibration", "--out", str(trained_run)], "inside the run directory"),
        (["--text", "ü ü"], "not in this character tokenizer's vocabulary"),
        ([], "one of the arguments --text --file --val is required"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, "score", r, *argv)
        assert code == 2 and err.startswith("llmlab: error: ") and err.count("\n") == 1, (argv, err)
        assert out == "", (argv, out)  # nothing printed before the error
        assert message in err, (argv, err)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in trained_run.iterdir() if p.is_file()}
    assert after == before and not (trained_run / "x.html").exists()


def test_scoring_a_corrupt_validation_split_is_a_one_line_error(tmp_path, trained_run, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    val = run / "data" / "val.bin"
    val.write_bytes(b"\xff" * val.stat().st_size)  # ids past the vocabulary: an IndexError in the embedding before
    code, _, err = run_cli(capsys, "score", str(run), "--val", "10")
    assert code == 2 and err.count("\n") == 1 and "val.bin holds token id 65535, and the vocabulary has" in err
    train = run / "data" / "train.bin"
    val.write_bytes((trained_run / "data" / "val.bin").read_bytes())
    train.write_bytes(b"\xff" * train.stat().st_size)  # a bad train split does not stop scoring the val split
    assert run_cli(capsys, "score", str(run), "--val", "10")[0] == 0


def test_keeping_too_many_logits_for_calibration_is_a_user_error(monkeypatch):
    model = GPT(ModelConfig(vocab_size=30, block_size=16, n_layers=1, n_heads=2, d_model=16)).eval()
    monkeypatch.setattr(score_lib, "MAX_KEPT_LOGITS", 30 * 50)
    with pytest.raises(
        UserError, match="99 predictions × 30 logits is too much to keep for calibration; score at most 50"
    ):
        score_ids(model, [1] * 100, keep_logits=True)
    assert score_ids(model, [1] * 100).windows == 12  # without keep_logits nothing is held


def test_non_overlapping_windows_equal_the_training_evaluation_batches():
    """Reference: `data.sequential_batches` + F.cross_entropy, the path training's validation loss takes."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(vocab_size=30, block_size=16, n_layers=2, n_heads=4, d_model=32)).eval()
    tokens = np.random.default_rng(0).integers(0, 30, 16 * 10 + 1)
    sc = score_ids(model, tokens.tolist(), stride=16)
    with torch.no_grad():
        ref = [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
               for x, y in sequential_batches(tokens, 16, 4)]  # fmt: skip
    torch.testing.assert_close(sc.surprisal, torch.cat(ref))
    assert sc.windows == 10


def test_visible_shows_whitespace_and_escapes_every_other_control_character():
    """The token table printed a raw carriage return (which sent the terminal's cursor back over the
    row) and raw NUL/VT in the alternatives. Reference: Python's repr escapes of the Cc category."""
    from llmlab.score import visible

    assert visible("a b\n\t") == "a␣b⏎⇥"
    assert [visible(c) for c in "\r\x00\x0b\x1b\x7f\x85"] == ["\\r", "\\x00", "\\x0b", "\\x1b", "\\x7f", "\\x85"]
    assert visible("é中🙂") == "é中🙂" and visible("") == "∅"
