"""Tour section for notes §一: the cross-entropy the notes' model was trained to minimise."""

from __future__ import annotations

from llmlab.sections import Section, Tour, html_img, html_table


def section(tour: Tour) -> Section:
    s = tour.notes_summary
    rows = [
        ("model", "preset notes: sinusoidal positions, ReLU FFN, post-LN, tied output layer"),
        ("parameters", f"{s['params']:,}"),
        ("steps", f"{s['steps']:,} in {s['elapsed_seconds']:.0f} s ({s['stopped_by']})"),
        ("tokens/s", f"{s['tokens_per_second']:,.0f}"),
        (
            "validation cross-entropy",
            f"{s['val_loss']:.4f} nats/token on the first {s['val_tokens']:,} tokens of "
            "the validation split, in windows of the context",
        ),
        ("validation perplexity", f"{s['val_perplexity']:.3f}"),
    ]
    tour.log(f"val loss {s['val_loss']:.4f} nats/token, perplexity {s['val_perplexity']:.2f}")
    body = (
        "<p>The training objective is the cross-entropy L = −Σ y log p of the next token "
        "(notes §一), averaged over every position; perplexity is exp(L).</p>"
        + html_table(rows) + html_img(tour.notes_dir / "loss.png", "loss curve")
        + "<p>The curve's validation points are estimates from random batches of the whole split, so its "
        "last one differs from the figure above, which is over a fixed stretch of it.</p>"
    )  # fmt: skip
    return Section("Training: cross-entropy (notes §一)", body, dict(s))
