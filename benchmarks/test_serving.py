"""`make bench`: the serving benchmark (see serving.py); writes results/serving.json."""

from __future__ import annotations

import json

from benchmarks import serving


def test_serving_throughput() -> None:
    results = serving.run()
    serving.RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    # vLLM batches: concurrency 8 must beat one-at-a-time serving by the server itself.
    engine = results["lmforge_serve"]
    assert (
        engine["concurrency_8"]["tokens_per_second"] > engine["concurrency_1"]["tokens_per_second"]
    )
