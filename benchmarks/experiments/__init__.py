"""The paper's comparison in simulation (issue 3, item 6).

Cascadia's plan against the best single model, a CascadeServe-style baseline (our
re-implementation of that policy) and two ablations, on 32 H100 in 4 nodes of 8, for the
Llama-3 8B -> 70B and DeepSeek 7B -> 70B -> 671B-AWQ cascades over the Azure conversation
and code traces. Rerun everything with

    .venv/bin/python -m benchmarks.experiments.run_all --out benchmarks/results/experiments [--quick]

Modules: ``scenarios`` (what is compared: traces, windows, quality profiles, targets),
``systems`` (how each system deploys), ``metrics`` (pure functions of latency arrays),
``run_all`` (the loop and the JSON), ``report`` (markdown table and plots from the JSON).
"""
