"""`llmlab import-hf`."""

from __future__ import annotations

import argparse

from llmlab.cli.common import emit
from llmlab.errors import UserError, reason


def run(args: argparse.Namespace) -> None:
    """Read a local Hugging Face GPT-2 checkpoint directory into a run directory (--out)."""
    from llmlab.hf import check_import_out, import_hf
    from llmlab.run_dir import load_run

    if (args.dir is None) == (args.hub is None):
        raise UserError("give either a checkpoint directory or --hub NAME")
    check_import_out(args.out)  # before a download, which may take minutes
    src = args.dir if args.hub is None else _download(args.hub)
    out = import_hf(src, args.out)
    run = load_run(out)
    emit(args, {"run_dir": str(out), "params": run.model.num_params(), "vocab_size": run.model_cfg.vocab_size,
                "n_layers": run.model_cfg.n_layers, "d_model": run.model_cfg.d_model},
         lambda: print(f"imported {src} → {out} ({run.model.num_params():,} parameters)"))  # fmt: skip


def _download(name: str) -> str:
    """Only on an explicit --hub NAME: fetch the files llmlab reads from the Hugging Face Hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError("--hub needs the huggingface_hub package (pip install huggingface_hub)") from None
    try:
        return snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.json", "merges.txt"])
    except Exception as e:  # network and hub errors come in many types; the first line says what failed
        raise UserError(f"cannot download {name!r} from the Hugging Face Hub ({reason(e)})") from None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", metavar="DIR", help="a local GPT-2 checkpoint (config.json, weights, tokenizer)")
    p.add_argument("--hub", metavar="NAME", help="download NAME from the Hugging Face Hub instead (needs network)")
    p.add_argument("--out", required=True, metavar="RUN", help="the run directory to write (must not exist)")
