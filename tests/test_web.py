"""The web app's JSON API (`llmlab.web`) and `llmlab serve`.

Each instrument is checked against what the command it stands for prints with --json (the same
library call, reached through the CLI: that the page shows the command's numbers), and its
numbers against an independent reference: F.cross_entropy and scipy.stats.entropy for score;
PyTorch's fused scaled_dot_product_attention for the attention pattern; FlopCounterMode on the
real model and its own parameter count for count; the hook activations and E·v_i for neurons;
metrics.csv read by the csv module for the loss curve. Bad input: 400 and one line, everywhere.
"""

from __future__ import annotations

import csv
import json
import math
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from scipy import stats

from llmlab.run_dir import Run, load_run
from llmlab.web.app import create_app
from tests.conftest import run_cli, serving

TEXT = "def f3(x, y):\n    return x * y\n"  # 31 tokens: one window of the 32-token context


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Run:
    return load_run(trained_run)


@pytest.fixture(scope="module")
def client(run: Run) -> TestClient:
    return TestClient(create_app(run))


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def post(client: TestClient, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_page_and_its_scripts_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert client.get(asset).status_code == 200


def test_run_info_is_the_run_directory(client, run, trained_run):
    """Reference: config.json and metrics.csv read directly; the model's own parameter count."""
    info = client.get("/api/run").json()
    config = json.loads((trained_run / "config.json").read_text())
    assert info["model"] == config["model"] and info["train"] == config["train"]
    assert info["params"] == sum(p.numel() for p in run.model.parameters())
    assert info["tokenizer"] == {"kind": "char", "vocab_size": run.tokenizer.vocab_size}
    with open(trained_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert info["metrics"]["step"] == [int(r["step"]) for r in rows] == list(range(1, 81))
    assert info["metrics"]["train_loss"] == pytest.approx([float(r["train_loss"]) for r in rows])
    evals = [r for r in rows if r["val_loss"]]
    assert info["metrics"]["val_step"] == [int(r["step"]) for r in evals] and len(evals) >= 2
    assert info["metrics"]["val_loss"] == pytest.approx([float(r["val_loss"]) for r in evals])
    best = min(float(r["val_loss"]) for r in evals)
    assert info["metrics"]["best_val_loss"] == pytest.approx(best)
    assert info["metrics"]["best_val_perplexity"] == pytest.approx(math.exp(best))
    assert info["example_fact"] is None  # not a bios run


def test_score_equals_the_cli_and_cross_entropy(client, run, capsys, trained_run):
    """Reference: `llmlab score --json` (equal), F.cross_entropy and scipy.stats.entropy of one forward pass."""
    got = post(client, "/api/score", {"text": TEXT, "temperature": 0.8, "top_k": 3})
    cli = cli_json(capsys, "score", str(trained_run), "--text", TEXT, "--temperature", "0.8", "--top-k", "3")
    assert got == {k: v for k, v in cli.items() if k not in ("run", "source")}
    ids = torch.tensor(run.tokenizer.encode(TEXT))
    with torch.no_grad():
        logits = run.model(ids[None, :-1])[0] / 0.8  # [m, V]
    assert got["totals"]["mean_surprisal"] == pytest.approx(F.cross_entropy(logits, ids[1:]).item(), rel=1e-5)
    entropy = stats.entropy(logits.softmax(-1).double().numpy(), axis=-1)
    assert [t["entropy"] for t in got["tokens"][1:]] == pytest.approx(entropy.tolist(), abs=1e-5)
    assert len(got["tokens"][1]["alternatives"]) == 3 and got["tokens"][0]["surprisal"] is None


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.2, "top_k": 5, "seed": 7}])
def test_generate_equals_the_cli(client, capsys, trained_run, sampling):
    """Reference: `llmlab generate --entropy --json` with the same prompt, sampling and seed."""
    body = {"prompt": "def f1", "max_new_tokens": 24, "seed": 1337} | sampling
    got = post(client, "/api/generate", body)
    argv = ["generate", str(trained_run), "--prompt", "def f1", "--max-new-tokens", "24", "--entropy"]
    argv += ["--temperature", str(body["temperature"]), "--seed", str(body["seed"])]
    argv += ["--top-k", str(body["top_k"])] if "top_k" in body else []
    cli = cli_json(capsys, *argv)
    for key in ("prompt", "text", "token_ids", "token_texts", "entropies", "mean_entropy", "max_entropy"):
        assert got[key] == cli[key], key
    assert len(got["token_ids"]) == 24 and "".join(got["token_texts"]) == got["text"]


def stream(client: TestClient, body: dict) -> list[dict]:
    response = client.post("/api/generate/stream", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.2, "top_k": 5, "seed": 7}])
def test_the_stream_is_generate_a_token_at_a_time(client, sampling):
    """Reference: /api/generate (itself equal to the CLI) on the same request: the last line is
    its answer, and the lines before are its tokens, entropies and token texts, in order."""
    body = {"prompt": "def f1", "max_new_tokens": 24, "seed": 1337} | sampling
    whole = post(client, "/api/generate", body)
    *tokens, last = stream(client, body)
    assert last == {"done": whole}
    assert [t["token_id"] for t in tokens] == whole["token_ids"]
    assert [t["entropy"] for t in tokens] == whole["entropies"]
    assert [t["text"] for t in tokens] == whole["token_texts"]
    assert post(client, "/api/generate", body) == whole  # the stream released the lock


def test_a_stream_left_after_one_line_frees_the_model(trained_run):
    """On a real server (`llmlab serve`), a reader that goes away mid-stream must not keep the
    model's lock: the next request is answered within 10 s, where a lock held across the stream
    waits for the garbage collector to find the abandoned generator. (TestClient reads a closed
    stream to its end, so it cannot show this.)"""
    import http.client
    from urllib.parse import urlsplit

    from tests.conftest import serving

    with serving(trained_run) as url:
        where = urlsplit(url)
        reader = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        reader.request("POST", "/api/generate/stream", json.dumps({"prompt": "def", "max_new_tokens": 1000}),
                       {"Content-Type": "application/json"})  # fmt: skip
        first = json.loads(reader.getresponse().readline())
        assert set(first) == {"token_id", "text", "entropy"}
        reader.close()  # gone after one line
        body = json.dumps({"prompt": "def", "max_new_tokens": 3}).encode()
        request = urllib.request.Request(url + "api/generate", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert len(json.loads(answer.read())["token_ids"]) == 3


def test_a_plain_generate_stops_when_its_client_hangs_up(run):
    """A client of /api/generate that hangs up before its answer (a closed tab, a script's timeout)
    stops the decoding: counted by a hook on the model's forward (each token one call, slowed to
    10 ms so that 1000 tokens would take 10 s), on a real uvicorn server in this process. Before,
    the request ran to its 1000 tokens with nobody left to read them."""
    import http.client
    import threading
    import time

    import uvicorn

    calls: list[float] = []

    def slow(module, inputs, output):
        calls.append(time.monotonic())
        time.sleep(0.01)

    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    handle = run.model.register_forward_hook(slow)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        client.request("POST", "/api/generate", json.dumps({"prompt": "def", "max_new_tokens": 1000}),
                       {"Content-Type": "application/json"})  # fmt: skip
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        client.close()  # hung up, the answer unread
        hung_up = time.monotonic()
        time.sleep(1.0)
        after = [t for t in calls if t > hung_up]
        assert 5 <= len(calls) < 100 and len(after) <= 10, (len(calls), len(after))  # ≤ 1 poll + 1 token late
        time.sleep(0.5)
        assert not [t for t in calls if t > hung_up + 1.0]  # and nothing since
    finally:
        handle.remove()
        server.should_exit = True
        thread.join(timeout=30)
    answer = post(TestClient(create_app(run)), "/api/generate", {"prompt": "def", "max_new_tokens": 3})
    assert len(answer["token_ids"]) == 3  # the model was left usable


def test_rejection_sampling_draws_the_models_next_token_distribution(client, run):
    """References: p = F.softmax of the model's last logits, q = softmax(z / T_q), M = max p/q (numpy);
    the acceptance rate within 4 binomial standard deviations of 1/M; the accepted draws' counts
    against p by scipy.stats.chisquare (the top tokens, the rest pooled)."""
    prompt, n = "def f1(x, y):\n", 5000
    r = post(client, "/api/rejection", {"prompt": prompt, "proposal_temperature": 1.5, "samples": n, "seed": 3})
    with torch.no_grad():
        z = run.model(torch.tensor([run.tokenizer.encode(prompt)]))[0, -1].double()  # [V]
    p, q = F.softmax(z, -1).numpy(), F.softmax(z / 1.5, -1).numpy()
    assert r["envelope"] == pytest.approx(float((p / q).max()), rel=1e-9)
    assert r["expected_acceptance"] == pytest.approx(1 / r["envelope"])
    assert r["accepted"] == n and r["acceptance_rate"] == r["accepted"] / r["proposed"]
    a = 1 / r["envelope"]
    assert abs(r["acceptance_rate"] - a) < 4 * math.sqrt(a * (1 - a) / r["proposed"])
    shown = r["tokens"]
    assert [t["id"] for t in shown] == list(np.argsort(-p, kind="stable")[: len(shown)])
    assert [t["p"] for t in shown] == pytest.approx([p[t["id"]] for t in shown])
    big = [t for t in shown if t["p"] * n >= 5]
    observed = [t["frequency"] * n for t in big] + [n - sum(t["frequency"] * n for t in big)]
    expected = [t["p"] * n for t in big] + [n - sum(t["p"] * n for t in big)]
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert 0 < r["total_variation"] < 0.1 and 0 < r["total_variation_direct"] < 0.1


def test_attention_pattern_is_masked_softmax_and_times_v_equals_fused_attention(client, run):
    """Reference: PyTorch's scaled_dot_product_attention (the model's fused path, no pattern hooked):
    pattern · V equals each head's output z; rows sum to 1, the masked upper triangle is exactly 0,
    and the entropies are scipy.stats.entropy of the rows."""
    prompt = "def f12(x, y):"
    got = post(client, "/api/attention", {"prompt": prompt, "layer": 1})
    pattern = torch.tensor(got["pattern"])  # [h, S, S]
    h, S = run.model_cfg.n_heads, len(prompt)
    assert pattern.shape == (h, S, S) and got["tokens"] == list(prompt) and got["layer"] == 1
    assert torch.allclose(pattern.sum(-1), torch.ones(h, S), atol=1e-5)
    assert bool((pattern.triu(diagonal=1) == 0).all())  # the mask: no query sees a later key
    ids = torch.tensor([run.tokenizer.encode(prompt)])
    _, cache = run.model.run_with_cache(ids, names=["blocks.1.attn.hook_v", "blocks.1.attn.hook_z"])
    v = cache["blocks.1.attn.hook_v"][0].transpose(0, 1)  # [h, S, D]
    z = cache["blocks.1.attn.hook_z"][0].transpose(0, 1)  # [h, S, D], from the fused kernel
    assert torch.allclose(pattern @ v, z, atol=1e-5)
    reference = torch.from_numpy(stats.entropy(pattern.double().numpy(), axis=-1))  # [h, S]
    assert torch.allclose(torch.tensor(got["entropy"], dtype=torch.float64), reference, atol=1e-5)
    assert got["mean_entropy"] == pytest.approx(reference.mean(-1).tolist(), abs=1e-5)


def test_trace_count_and_locate_equal_the_cli(client, capsys, trained_run):
    """Reference: `llmlab trace`, `llmlab count` and `llmlab knowledge locate` with --json."""
    prompt = "def f2(x"
    assert post(client, "/api/trace", {"prompt": prompt}) == cli_json(
        capsys, "trace", str(trained_run), "--prompt", prompt
    )
    assert client.get("/api/count").json() == cli_json(capsys, "count", str(trained_run))
    fact = {"prompt": "def f4(x, y):\n    return x {} y", "subject": "-", "target": "*"}
    got = post(client, "/api/locate", fact | {"samples": 4})
    argv = ["knowledge", "locate", str(trained_run), "--prompt", fact["prompt"], "--subject", "-"]
    argv += ["--target", "*", "--samples", "4", "--out", str(trained_run.parent / "locate-plots")]
    cli = cli_json(capsys, *argv)
    assert got == {k: v for k, v in cli.items() if k != "plots"}
    assert got["p_clean"] > got["p_corrupt"]


@pytest.mark.parametrize("method", ["rome", "memit", "ft-l"])
def test_edit_equals_the_cli_and_leaves_the_served_model_unchanged(client, run, capsys, trained_run, tmp_path,
                                                                   method):  # fmt: skip
    """Reference: `llmlab knowledge edit --json` on the same fact (less the run it writes), greedy
    decoding by the source run and by the edited run it wrote, and the served weights before the
    request, bit for bit (MEMIT edits both layers of this model)."""
    from llmlab.sampling import SamplingConfig, generate_text

    fact = {"prompt": "def f4(x, y):\n    return x {} y", "subject": "-", "target": "+"}
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    got = post(client, "/api/edit", fact | {"method": method, "site": "answer", "new_tokens": 8})
    argv = ["knowledge", "edit", str(trained_run), "--method", method, "--set", "site=answer", "--prompt",
            fact["prompt"], "--subject", "-", "--target", "+", "--out", str(tmp_path / "edited")]  # fmt: skip
    cli = cli_json(capsys, *argv)
    timing = {"seconds", "stats_seconds"}
    assert {k: v for k, v in got.items() if k not in timing | {"text", "before", "after"}} == {
        k: v for k, v in cli.items() if k not in timing | {"run", "source"}}  # fmt: skip
    assert got["layers"] == ([0, 1] if method == "memit" else [0])
    assert got["site"] == (None if method == "ft-l" else "answer")  # FT-L has no site to echo
    again = post(client, "/api/edit", fact | {"method": method, "site": "answer", "new_tokens": 8})
    assert again["stats_seconds"] == 0.0  # C is kept between edits (ft-l needs none)
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in got.items() if k not in timing}
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in weights.items())  # undone
    assert all(p.grad is None for p in run.model.parameters())
    greedy = SamplingConfig(0.0)
    assert got["text"] == "def f4(x, y):\n    return x - y"
    assert got["before"] == generate_text(run.model, run.tokenizer, got["text"], 8, greedy).text
    edited = load_run(tmp_path / "edited")
    assert got["after"] == generate_text(edited.model, edited.tokenizer, got["text"], 8, greedy).text
    if method == "rome":
        assert got["p_target_after"] > 3 * got["p_target_before"] and got["reliability"] == 1.0  # '+' now the argmax
        assert got["after"].startswith(" +") and not got["before"].startswith(" +")


def test_count_is_the_real_models_parameters_and_measured_flops(client, run):
    """Reference: the model's own parameters, and PyTorch's FlopCounterMode on a real forward pass
    of B × S random tokens with the run's weights (the report measures a meta-device copy). The
    explicit attention path is used: FlopCounterMode does not count the CPU's fused SDPA kernel."""
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from llmlab.model import GPT

    count = client.get("/api/count").json()
    assert count["params"]["total"] == sum(p.numel() for p in run.model.parameters())
    B, S = run.train_cfg.batch_size, run.model_cfg.block_size
    assert (count["batch"], count["seq"]) == (B, S)
    model = GPT(replace(run.model_cfg, attention="explicit"))
    model.load_state_dict(run.model.state_dict())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, run.model_cfg.vocab_size, (B, S)))
    assert count["flops"]["forward"]["exact"] == counter.get_total_flops() == count["flops"]["forward"]["measured"]


def test_neurons_equal_the_cli_and_are_the_ffn_activations(client, run, capsys, trained_run):
    """Reference: `llmlab knowledge neurons --json`; m_i read at `mlp.hook_post`, and E·v_i computed here."""
    prompt = "return x"
    got = post(client, "/api/neurons", {"prompt": prompt, "top": 3, "tokens": 2})
    cli = cli_json(capsys, "knowledge", "neurons", str(trained_run), "--prompt", prompt, "--top", "3", "--tokens", "2")
    assert got == cli
    ids = torch.tensor([run.tokenizer.encode(prompt)])
    _, cache = run.model.run_with_cache(ids, names=lambda n: n.endswith("mlp.hook_post"))
    for layer, memories in enumerate(got["layers"]):
        m = cache[f"blocks.{layer}.mlp.hook_post"][0, -1]  # [F]
        assert [x["activation"] for x in memories] == pytest.approx(m.topk(3).values.tolist())
        first = memories[0]
        logits = run.model.unembed.weight @ run.model.blocks[layer].mlp.w2.weight[:, first["neuron"]]  # [V]
        assert first["scores"] == pytest.approx(logits.topk(2).values.tolist(), rel=1e-5)


LOCATE = {"prompt": "def {}", "subject": "f", "target": "x"}
BAD = [
    ("/api/score", {"text": TEXT, "temprature": 1}, "temprature: Extra inputs are not permitted"),
    ("/api/score", {"txt": TEXT}, "txt: Extra inputs are not permitted"),  # was "text: Field required"
    ("/api/score", {"text": TEXT, "\n\nx": 1}, "'\\n\\nx': Extra inputs are not permitted"),  # on one line
    ("/api/score", {"text": 3}, "text: Input should be a valid string"),
    ("/api/score", {}, "text: Field required"),
    ("/api/score", {"text": ""}, "the text is empty: nothing to score"),
    ("/api/score", {"text": "d"}, "single token"),
    ("/api/score", {"text": "d" * 20_001}, "text: String should have at most 20000 characters"),
    ("/api/score", {"text": "def λ"}, "character 'λ' (U+03BB) is not in this character tokenizer's vocabulary"),
    ("/api/score", {"text": TEXT, "temperature": 0}, "temperature must be a positive number, got 0.0"),
    ("/api/score", {"text": TEXT, "temperature": 1e-300}, "scoring takes a temperature of at least 0.01, got 1e-300"),
    ("/api/score", {"text": TEXT, "top_k": -1}, "top_k: Input should be greater than or equal to 0"),
    ("/api/score", {"text": TEXT, "top_k": "5"}, "top_k: Input should be a valid integer"),
    ("/api/generate", {"prompt": ""}, "the prompt is empty"),
    ("/api/generate", {"prompt": "x" * 33}, "the prompt is 33 tokens long, but the model's context is 32"),
    ("/api/generate", {"prompt": "def", "temperature": -1}, "temperature must be a finite number >= 0"),
    ("/api/generate", {"prompt": "def", "temperature": None}, "temperature: Input should be a valid number"),
    ("/api/generate", {"prompt": "def", "top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ("/api/generate", {"prompt": "def", "top_k": 0}, "top_k must be at least 1, got 0"),
    ("/api/generate", {"prompt": "def", "max_new_tokens": 5000}, "max_new_tokens: Input should be less than"),
    ("/api/generate", {"prompt": "def", "seed": "one"}, "seed: Input should be a valid integer"),
    ("/api/generate", {"prompt": "def", "seed": 2**70}, "seed: Input should be less than or equal to 9223"),
    ("/api/generate/stream", {"prompt": "x" * 33}, "the prompt is 33 tokens long, but the model's context is 32"),
    ("/api/generate/stream", {"prompt": "def", "top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ("/api/generate/stream", {"prompt": "def", "max_new_tokens": 5000}, "max_new_tokens: Input should be less than"),
    ("/api/generate", {"prompt": "def", "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ("/api/rejection", {"prompt": "def", "proposal_temperature": 0}, "proposal_temperature must be a positive finite"),
    ("/api/rejection", {"prompt": "def", "samples": 0}, "samples: Input should be greater than or equal to 1"),
    ("/api/rejection", {"prompt": "def", "samples": 100_001}, "samples: Input should be less than or equal to 100000"),
    ("/api/rejection", {"prompt": "def", "proposal_temperature": 0.05, "samples": 100_000}, "proposals on average"),
    ("/api/rejection", {"prompt": ""}, "the prompt is empty"),
    ("/api/rejection", {"prompt": "def", "proposal_temperature": 1e-300}, "is 0 where p is not, so no envelope"),
    ("/api/rejection", {"prompt": "def", "proposal_temperature": 5e-324}, "is 0 where p is not, so no envelope"),
    ("/api/attention", {"prompt": "def", "layer": 2}, "layer must be from 0 to 1, got 2"),
    ("/api/attention", {"prompt": "def", "layer": True}, "layer: Input should be a valid integer"),
    ("/api/attention", {"prompt": "x" * 40}, "the prompt is 40 tokens long, but the model's context is 32"),
    ("/api/trace", {"prompt": ""}, "the prompt is empty"),
    ("/api/locate", {"prompt": "def f", "subject": "g", "target": "x"}, "does not occur in the prompt"),
    ("/api/locate", LOCATE | {"samples": 0}, "samples: Input should be greater than or equal to 1"),
    ("/api/locate", LOCATE | {"samples": 11}, "samples: Input should be less than or equal to 10"),
    ("/api/locate", LOCATE | {"noise": -1}, "noise must be a number from 0 to 100"),
    ("/api/locate", LOCATE | {"noise": 1e308}, "noise must be a number from 0 to 100"),
    ("/api/locate", LOCATE | {"seed": 2**64}, "seed: Input should be less than or equal to 9223"),
    ("/api/edit", {"prompt": "def f", "subject": "g", "target": "x"}, "does not occur in the prompt"),
    ("/api/edit", LOCATE | {"target": ""}, "the target '' tokenizes to nothing"),
    ("/api/edit", LOCATE | {"method": "grace"}, "unknown editing method 'grace' (choose from: ft-l, rome, memit)"),
    ("/api/edit", LOCATE | {"site": "middle"}, "unknown site 'middle'"),
    ("/api/edit", LOCATE | {"new_tokens": 101}, "new_tokens: Input should be less than or equal to 100"),
    ("/api/edit", LOCATE | {"prompt": "x" * 40 + "{}"}, "the prompt and target are 42 tokens, over the context of 32"),
    ("/api/neurons", {"prompt": ""}, "the prompt is empty"),
    ("/api/neurons", {"prompt": "def", "position": 3}, "position 3 is outside the prompt's 3 tokens"),
    ("/api/neurons", {"prompt": "def", "top": 0}, "top: Input should be greater than or equal to 1"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "message"), BAD)
def test_bad_input_is_400_with_one_line(client, path, body, message):
    response = client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error and "\n" not in error


def test_malformed_bodies_and_unknown_paths_are_one_line(client):
    cases = [
        (b'{"text": ', "not valid JSON"),
        (b'{"text": "\xff\xfe"}', "could not be read as JSON (not UTF-8"),
        (b"[1, 2]", "the request body must be a JSON object"),
        (b'{"text": "x\\ud800y"}', "text is not valid UTF-8"),  # a lone surrogate, escaped
        (b'{"text": "x", "a\\ud800": 1}', "the field name 'a\\ud800' is not valid UTF-8"),
        (b'{"prompt": "x\\ud800 {}", "subject": "x", "target": "y"}', "prompt is not valid UTF-8"),
        (b"null", "the request body must be a JSON object"),
        (b"5", "the request body must be a JSON object"),
        (b'{"top_k": ' + b"9" * 5000 + b"}", "a number of thousands of digits"),
    ]
    for body, message in cases:
        path = "/api/locate" if b"subject" in body else "/api/score"
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and message in response.json()["error"], response.text
    assert client.get("/api/nope").json() == {"error": "Not Found"}


def test_wrong_content_type_empty_body_deep_nesting_and_wrong_method_are_one_line(client):
    for media in ("application/ld+json", "Application/JSON"):  # FastAPI reads both
        answer = client.post("/api/score", content=b'{"text": 5}', headers={"content-type": media})
        assert answer.status_code == 400 and answer.json()["error"] == "text: Input should be a valid string", media
    form = client.post("/api/score", content=b"text=abc", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 400 and "content-type: application/json" in form.json()["error"]
    empty = client.post("/api/score", content=b"", headers={"content-type": "application/json"})
    assert empty.status_code == 400 and empty.json()["error"] == "the request body is empty: send a JSON object"
    deep = client.post(
        "/api/score", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}
    )
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    wrong = client.get("/api/score")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}
    assert wrong.headers["allow"] == "POST"  # RFC 9110 §15.5.6: a 405 lists the methods the path takes
    assert client.delete("/api/run").headers["allow"] == "GET"
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load scripts from a CDN
    assert client.get("/openapi.json").json() == {"error": "Not Found"}
    slash = client.get("/api/run/", follow_redirects=False)  # no redirect without a body: a JSON 404
    assert slash.status_code == 404 and slash.json() == {"error": "Not Found"}


def test_inf_and_nan_are_sent_as_null_for_the_page(run, monkeypatch):
    """JSON has no inf or NaN (a perplexity beyond the largest float): they are null, as in `--json`."""
    from llmlab.web import instruments

    monkeypatch.setattr(instruments, "score", lambda *a: {"perplexity": math.inf, "xs": [math.nan, 1.5, -math.inf]})
    r = TestClient(create_app(run)).post("/api/score", json={"text": TEXT})
    assert r.status_code == 200 and r.text == '{"perplexity":null,"xs":[null,1.5,null]}'


def test_a_vanishing_temperature_or_top_p_generates_the_greedy_text(client):
    greedy = post(client, "/api/generate", {"prompt": "def f1", "max_new_tokens": 16, "temperature": 0})
    for limit in ({"temperature": 1e-300}, {"top_p": 1e-300}):
        assert (
            post(client, "/api/generate", {"prompt": "def f1", "max_new_tokens": 16} | limit)["text"] == greedy["text"]
        )


def test_the_model_serves_one_request_at_a_time(run, monkeypatch):
    """The lock: while one request is inside an instrument, a second one waits outside it.

    The first request holds the instrument until it is released; the second is sent meanwhile,
    and has not entered when the first is released (without the lock it enters at once)."""
    import threading

    from llmlab.web import instruments

    entered = {"first": threading.Event(), "second": threading.Event()}
    release = threading.Event()
    order: list[str] = []

    def held_score(run_, text, temperature, top_k):
        order.append(f"in {text}")
        entered[text].set()
        if text == "first":
            assert release.wait(10)
        order.append(f"out {text}")
        return {}

    monkeypatch.setattr(instruments, "score", held_score)
    client = TestClient(create_app(run))
    first = threading.Thread(target=client.post, args=("/api/score",), kwargs={"json": {"text": "first"}})
    second = threading.Thread(target=client.post, args=("/api/score",), kwargs={"json": {"text": "second"}})
    first.start()
    assert entered["first"].wait(10)
    second.start()
    assert not entered["second"].wait(0.5)  # the second is kept out while the first holds the model
    release.set()
    first.join(10)
    second.join(10)
    assert order == ["in first", "out first", "in second", "out second"]


def test_attention_maps_and_causal_traces_have_size_limits(client, monkeypatch):
    from llmlab.web import instruments

    monkeypatch.setattr(instruments, "MAX_ATTENTION_TOKENS", 8)
    r = client.post("/api/attention", json={"prompt": "def f1(x):"})
    assert r.status_code == 400 and "the prompt is 10 tokens; the attention maps show at most 8" in r.json()["error"]
    monkeypatch.setattr(instruments, "MAX_LOCATE_TOKENS", 8)
    r = client.post("/api/locate", json={"prompt": "def f1({}, y)", "subject": "x", "target": "*"})
    assert r.status_code == 400 and "the fact is 13 tokens; the page traces at most 8" in r.json()["error"]


def test_a_bios_run_offers_a_fact_of_its_world(run):
    """Reference: the bios world rebuilt from the run's data spec: its first person's birth date
    to trace, and birth city to edit."""
    from dataclasses import replace

    from llmlab import bios
    from llmlab.knowledge import fill
    from llmlab.web import instruments

    spec = "bios:people=5"
    fact = instruments.run_info(replace(run, meta={"data": spec}))["example_fact"]
    person = bios.world_of(spec).people[0]
    assert (fact["subject"], fact["target"]) == (person.name, person.facts[bios.BASE_ATTRIBUTES[0]])
    text, start = fill(fact["prompt"], fact["subject"])
    assert text[start:].startswith(person.name) and text.endswith(("on", "in", "at", "as", "by", "for"))
    edit = instruments.run_info(replace(run, meta={"data": spec}))["example_edit"]  # its birth city, moved
    assert edit["subject"] == person.name and edit["prompt"] == bios.prompt(person, "birth_city")
    assert edit["target"] in bios.CITIES and edit["target"] != person.facts["birth_city"]
    assert instruments.run_info(run)["example_edit"] is None  # not a bios run


def test_a_run_without_metrics_and_a_diverged_one(run, tmp_path):
    """No metrics.csv (an imported run): empty curves, no best loss. NaN losses: left out, counted."""
    import shutil
    from dataclasses import replace

    from llmlab.web import instruments

    bare = tmp_path / "bare"
    shutil.copytree(run.path, bare)
    (bare / "metrics.csv").unlink()
    m = instruments.run_info(replace(run, path=bare))["metrics"]
    assert m["step"] == [] and m["best_val_loss"] is None and m["not_finite"] == 0
    lines = (run.path / "metrics.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    rows[2][header.index("train_loss")] = "nan"
    evaluated = [r for r in rows if r[header.index("val_loss")]]
    evaluated[-1][header.index("val_loss")] = "inf"
    (bare / "metrics.csv").write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n")
    m = instruments.run_info(replace(run, path=bare))["metrics"]
    assert len(m["step"]) == len(rows) - 1 and 3 not in m["step"] and m["not_finite"] == 2
    assert len(m["val_loss"]) == len(evaluated) - 1 and math.isfinite(m["best_val_loss"])


def test_damaged_lines_of_metrics_csv_are_left_out_and_named(run, tmp_path):
    """A file damaged outside llmlab (a truncated row, a word, an extra field, bad bytes) still
    draws: GET /api/run is 200 with the lines that parse, the others by line number."""
    import shutil
    from dataclasses import replace

    from llmlab.web import instruments

    bare = tmp_path / "damaged"
    shutil.copytree(run.path, bare)
    good = (run.path / "metrics.csv").read_bytes()
    n = len(good.decode().splitlines()) - 1  # rows under the header
    damaged = good + b"8,0.0001,1.4\n9,0.0001,abc,,1,1\n10,1,1,,1,1,7\n\xff\xfe,1,1,,1,1\n,1,1,,1,1\n,,,,,\n"
    (bare / "metrics.csv").write_bytes(damaged)
    m = instruments.run_info(replace(run, path=bare))["metrics"]
    assert len(m["step"]) == n and m["damaged_lines"] == [n + 2, n + 3, n + 4, n + 5, n + 6, n + 7]
    assert m["step"] == instruments.run_info(run)["metrics"]["step"]  # what parses is read as before
    answer = TestClient(create_app(replace(run, path=bare))).get("/api/run")  # was a 500
    assert answer.status_code == 200 and answer.json()["metrics"]["damaged_lines"] == m["damaged_lines"]
    (bare / "metrics.csv").write_bytes(good.replace(b"step", b"st\xffp", 1))  # a damaged header: every line
    m = instruments.run_info(replace(run, path=bare))["metrics"]
    assert m["step"] == [] and m["damaged_lines"] == list(range(1, n + 2))


def test_a_bug_is_a_one_line_500(run, monkeypatch):
    from llmlab.web import instruments

    def broken(*args):
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(instruments, "trace", broken)
    r = TestClient(create_app(run), raise_server_exceptions=False).post("/api/trace", json={"prompt": "def"})
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError: something went wrong"}


def test_a_bug_mid_stream_is_its_last_line_and_frees_the_model(run, monkeypatch):
    """After the 200 has gone out an error can only be a line: the 500's wording, then the end."""
    from llmlab.model import GPT

    real, calls = GPT.forward, []

    def breaks_on_the_third_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("kaboom\nagain")
        return real(self, *args, **kwargs)

    client = TestClient(create_app(run), raise_server_exceptions=False)
    monkeypatch.setattr(GPT, "forward", breaks_on_the_third_call)
    *tokens, last = stream(client, {"prompt": "def", "max_new_tokens": 10})
    assert len(tokens) == 2 and last == {"error": "internal error: RuntimeError: kaboom again"}
    monkeypatch.setattr(GPT, "forward", real)
    assert len(post(client, "/api/generate", {"prompt": "def", "max_new_tokens": 3})["token_ids"]) == 3


def test_the_page_loads_nothing_from_the_network():
    """Every script, style and request of the page is relative to the server."""
    from llmlab.web.app import STATIC

    for path in STATIC.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, path
        assert "//cdn" not in text and "@import" not in text, path


def test_a_nan_temperature_is_refused(client):
    response = client.post("/api/score", content=b'{"text": "def f", "temperature": NaN}',
                           headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"] == "temperature must be a positive number, got nan"


# --- llmlab serve ----------------------------------------------------------------------------


def test_serve_bad_arguments_are_one_line_exit_2(capsys, trained_run, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = str(taken.getsockname()[1])
    cases = [
        (["serve", str(tmp_path / "nope")], "does not exist"),
        (["serve", str(trained_run), "--port", "70000"], "--port must be from 0 to 65535"),
        (["serve", str(trained_run), "--port", port], f"cannot listen on 127.0.0.1:{port}"),
        (["serve", str(trained_run), "--host", "no.such.host.invalid"], "is not an address of this machine"),
    ]
    try:
        for argv, message in cases:
            code, out, err = run_cli(capsys, *argv)
            assert code == 2 and message in err and err.count("\n") == 1 and out == "", (argv, err)
    finally:
        taken.close()


def test_serve_answers_on_the_port_it_prints(trained_run):
    """The real command in a subprocess: its first line names the URL, and the API answers there."""
    with serving(trained_run) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/run", timeout=30) as r:
            info = json.load(r)
        assert info["run"] == trained_run.name and info["params"] > 0
        request = urllib.request.Request(url + "api/score", data=json.dumps({"text": TEXT}).encode(),
                                         headers={"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as r:
            assert math.isfinite(json.load(r)["totals"]["perplexity"])
