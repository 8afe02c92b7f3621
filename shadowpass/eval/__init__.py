"""Accuracy harness: SmolLM2-135M-Instruct offline, RULER-style long-context tasks, scoring.

Modules: ``smollm2`` (offline loader), ``tasks`` (seeded prompt generators), ``scoring``
(RULER string-match), ``harness`` (methods x budgets on the same prompts), ``plots``,
``cli`` (``shadowpass eval``). Nothing here downloads from a model hub.
"""
