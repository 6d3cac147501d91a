"""The one error type the metrics raise for bad input, so callers can fail fast before scoring."""
from __future__ import annotations


class MetricInputError(ValueError):
    """Images, prompts, labels, reference files, weights or options that a metric cannot use.

    Raised before any feature is computed: by `Evaluator.__init__` (unknown metric or option),
    `Evaluator.check` (a metric lacks its inputs, a weights file is missing or does not match
    its architecture, a reference batch is malformed) and `Evaluator.evaluate` (images of the
    wrong shape or dtype, counts that differ).
    """
