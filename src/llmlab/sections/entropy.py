"""Tour section for notes §一 (predictive entropy H(p) = −Σ p log p): where the notes' model is
unsure in its own samples, whether its confidence is calibrated, and whether entropy predicts
its mistakes on held-out text (ECE, Brier, temperature scaling, AUROC, PRR)."""

from __future__ import annotations

from typing import Any

import torch

from llmlab.calibration import calibrate, error_prediction, plot_rejection, plot_reliability
from llmlab.data import read_splits
from llmlab.entropy import mean_token_entropy, monte_carlo_sequence_entropy
from llmlab.run_dir import Run, load_run
from llmlab.sampling import SamplingConfig, generate_text
from llmlab.score import html_heatmap, html_legend, score_ids, token_pieces
from llmlab.sections import Section, Tour, html_img, html_table
from llmlab.sections.generation import prompts

SAMPLING = SamplingConfig(temperature=0.8)
SCALE = (0.0, 3.5)  # nats: one colour scale for all samples


def section(tour: Tour) -> Section:
    run = load_run(tour.notes_dir)
    torch.manual_seed(0)
    samples_html, samples = _samples(run, 100 if tour.quick else 200)
    held_out_html, held_out = _held_out(tour, run, 4000 if tour.quick else 16000)
    body = (
        "<p>Predictive entropy H(p) = −Σ p log p (notes §一) of the distribution each token was drawn "
        f"from (temperature {SAMPLING.temperature:g}): pale tokens were near-certain, red ones a guess among many. "
        "Hover a token for its entropy.</p>" + samples_html + held_out_html
    )  # fmt: skip
    return Section("Entropy and uncertainty (notes §一)", body, {"samples": samples, "held_out": held_out})


def _samples(run: Run, n: int) -> tuple[str, dict[str, Any]]:
    """Each prompt's sample as an entropy heat map, and its Monte-Carlo sequence entropy."""
    parts, figures = [], {}
    for i, prompt in enumerate(prompts(run.tokenizer)):
        g = generate_text(run.model, run.tokenizer, prompt, n, SAMPLING, seed=i)
        pieces = token_pieces(run.tokenizer, g.token_ids)
        tips = [None, *(f"entropy {h:.3f} nats" for h in g.entropies)]
        parts.append(html_heatmap([prompt, *pieces], [None, *g.entropies], "entropy", tips, SCALE, legend=False))
        ids = run.tokenizer.encode(prompt)
        mc = monte_carlo_sequence_entropy(run.model, ids, 16, 32, SAMPLING, seed=i)
        figures[prompt] = {"mean_token_entropy": mean_token_entropy(g.entropies), "max_entropy": max(g.entropies),
                           "mc_sequence_entropy_32": mc.estimate, "mc_std_error": mc.std_error}  # fmt: skip
    rows = [(repr(p), f"{f['mean_token_entropy']:.3f}", f"{f['max_entropy']:.3f}",
             f"{f['mc_sequence_entropy_32']:.1f} ± {f['mc_std_error']:.1f}") for p, f in figures.items()]  # fmt: skip
    table = html_table(rows, ("prompt", "mean token entropy", "max", "MC sequence entropy, 32 tokens (16 samples)"))
    note = ("<p>Monte-Carlo sequence entropy −(1/N) Σ log P(y⁽ᵏ⁾|x) over N sampled continuations estimates "
            "H(Y|x) of the whole continuation (Kuhn et al. 2023, arXiv 2302.09664), in nats.</p>")  # fmt: skip
    return "".join(parts) + html_legend("entropy", SCALE) + note + table, figures


def _held_out(tour: Tour, run: Run, n: int) -> tuple[str, dict[str, Any]]:
    """Calibration and error prediction on the first n tokens of the validation split."""
    ids = read_splits(tour.notes_dir / "data", run.model_cfg.vocab_size, checked=("val",)).val[:n].astype(int).tolist()
    scores = score_ids(run.model, ids, keep_logits=True, top_k=1)
    targets = torch.tensor(ids[1:])
    cal, ep = calibrate(scores.logits, targets), error_prediction(scores.logits, targets)
    tour.log(f"held-out ECE {cal.ece:.4f} → {cal.ece_scaled:.4f} (T* {cal.temperature:.2f}), "
             f"AUROC of entropy {ep.auroc_entropy:.3f}, PRR {ep.prr_entropy:.3f}")  # fmt: skip
    folder = tour.out / "entropy"
    figures = [plot_reliability(cal, folder / "reliability.png"), plot_rejection(ep, folder / "rejection.png")]
    rows = [
        ("held-out tokens", f"{len(ids) - 1:,} predictions from the validation split ({scores.windows} windows)"),
        ("top-1 accuracy", f"{cal.accuracy:.4f} (second half)"),
        ("ECE (15 bins)", f"{cal.ece:.4f} → {cal.ece_scaled:.4f} with temperature scaling, T* = {cal.temperature:.3f}"),
        ("Brier (top-1)", f"{cal.brier:.4f} → {cal.brier_scaled:.4f}"),
        ("AUROC, entropy → top-1 miss", f"{ep.auroc_entropy:.4f} (1 − max p: {ep.auroc_max_prob:.4f})"),
        ("PRR (random 0, oracle 1)", f"{ep.prr_entropy:.4f} (1 − max p: {ep.prr_max_prob:.4f})"),
    ]  # fmt: skip
    groups = [(f"{g['entropy_lo']:.2f} – {g['entropy_hi']:.2f}", f"{g['error_rate']:.3f}") for g in ep.by_entropy]
    by_entropy = html_table(groups, ("entropy (nats), fifths of the tokens", "top-1 error rate"))
    body = (
        "<h3>Is the model's confidence worth anything?</h3><p>T* is fitted on the first half of the held-out "
        "tokens and measured on the second (Guo et al. 2017, arXiv 1706.04599). Rejecting the most uncertain "
        "predictions first should raise the accuracy of the rest (prediction–rejection ratio, as LM-Polygraph "
        "reports it).</p>" + html_table(rows) + by_entropy
        + "".join(html_img(p, p.stem) for p in figures)
    )  # fmt: skip
    return body, {"calibration": {k: v for k, v in cal.to_json().items() if not k.startswith("bins")},
                  "error_prediction": ep.to_json()}  # fmt: skip
