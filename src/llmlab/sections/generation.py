"""Tour section for notes §2.1's last layer: softmax over the vocabulary, then sampling.

The model's last layer gives logits; softmax turns them into the next-token distribution p, and
every sampling setting is a transform of p (`llmlab.sampling`, the one implementation shared by
generation and speculative decoding). The section shows the same p under each setting, with
its entropy (notes §一), then samples.
"""

from __future__ import annotations

import html

import torch

from llmlab.entropy import entropy_of_probs
from llmlab.errors import UserError
from llmlab.run_dir import Run, load_run
from llmlab.sampling import SamplingConfig, generate_text, probs_from_logits
from llmlab.sections import Section, Tour, html_table
from llmlab.tokenizer import Tokenizer

SAMPLE_PROMPTS = ("def ", "class ", "import ")


def section(tour: Tour) -> Section:
    run = load_run(tour.notes_dir)
    n = 150 if tour.quick else 300
    cfg = SamplingConfig(temperature=0.8)
    samples = {p: generate_text(run.model, run.tokenizer, p, n, cfg, seed=i).text
               for i, p in enumerate(prompts(run.tokenizer))}  # fmt: skip
    for p, text in samples.items():
        tour.log(f"\n--- sample: {p!r} ---\n{p}{text}")
    prompt = prompts(run.tokenizer)[0]
    header, rows = distributions(run, prompt)
    body = (
        f"<p>The next-token distribution after {html.escape(repr(prompt))} under each sampling setting: the "
        "probabilities of the model's most likely tokens, how many tokens keep a non-zero probability, and "
        "the entropy H(p) of what is actually sampled from.</p>"
        + html_table(rows, header)
        + f"<p>Samples: temperature 0.8, KV cache, {n} new tokens per prompt.</p>"
        + "".join(f"<pre><b>{html.escape(p)}</b>{html.escape(t)}</pre>" for p, t in samples.items())
    )
    figures = {"samples": samples, "distributions": {"prompt": prompt, "header": header, "rows": rows}}
    return Section("Generation: softmax and sampling (notes §2.1)", body, figures)


SETTINGS = {
    "greedy (T = 0)": SamplingConfig(0.0),
    "T = 0.5": SamplingConfig(0.5),
    "T = 1: softmax(logits)": SamplingConfig(1.0),
    "T = 1.5": SamplingConfig(1.5),
    "top-k 3": SamplingConfig(1.0, top_k=3),
    "top-p 0.9": SamplingConfig(1.0, top_p=0.9),
}


@torch.no_grad()
def distributions(run: Run, prompt: str, shown: int = 5) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """One row per setting: the probabilities of the `shown` most likely tokens, the number of
    tokens with p > 0, and H(p) in nats."""
    logits = run.model(torch.tensor([run.tokenizer.encode(prompt)]))[0, -1]  # [V]
    top = logits.topk(shown).indices.tolist()
    header = ("setting", *(repr(run.tokenizer.decode([t])) for t in top), "tokens with p > 0", "H(p), nats")
    rows = []
    for name, cfg in SETTINGS.items():
        p = probs_from_logits(logits, cfg)  # [V]
        rows.append((name, *(f"{p[t].item():.3f}" for t in top), str(int((p > 0).sum())),
                     f"{entropy_of_probs(p).item():.3f}"))  # fmt: skip
    return header, rows


def prompts(tokenizer: Tokenizer) -> list[str]:
    """The sample prompts this tokenizer can encode (a character model trained on other text
    may lack their letters); a newline, or the first character of the vocabulary, otherwise."""
    ok = [p for p in SAMPLE_PROMPTS if _encodable(tokenizer, p)]
    return ok or (["\n"] if _encodable(tokenizer, "\n") else [tokenizer.decode([0])])


def _encodable(tokenizer: Tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text)
    except UserError:
        return False
    return True
