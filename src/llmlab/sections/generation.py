"""Tour section for notes §2.1's last layer: softmax over the vocabulary, then sampling."""

from __future__ import annotations

import html

from llmlab.errors import UserError
from llmlab.run_dir import load_run
from llmlab.sampling import SamplingConfig, generate_text
from llmlab.sections import Section, Tour
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
    body = f"<p>Temperature 0.8, KV cache, {n} new tokens per prompt.</p>" + "".join(
        f"<pre><b>{html.escape(p)}</b>{html.escape(t)}</pre>" for p, t in samples.items()
    )
    return Section("Generation: softmax and sampling (notes §2.1)", body, {"samples": samples})


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
