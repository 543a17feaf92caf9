"""Side-by-side benchmarks: llmlab against its peers on the same machine, in the same run."""
