"""frugalrt benchmark suite: ``python -m benchmarks`` (single thread, ratios measured side by side)."""
