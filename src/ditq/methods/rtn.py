"""Round-to-nearest: fit every weight quantizer on its weight and every static activation
quantizer on the layer's FP calibration inputs; no weight is changed.

Weight quantizers frozen by an earlier step (e.g. GPTQ) keep their parameters: RTN skips them and
logs how many and by whom. Static activation quantizers use the calibration sample for percentile /
MSE ranges and the exact full-data channel range for MinMax (see `Quantizer.fit(data_range=)`)."""
from __future__ import annotations

import logging
from collections import Counter

from ditq.methods.base import QuantContext, Step

log = logging.getLogger(__name__)


def _static(q) -> bool:
    return q is not None and not q.cfg.dynamic and not q.frozen


class RTN(Step):
    name = "rtn"

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        return any(_static(q.act_quantizer) for q in ctx.qlayers.values())

    def apply(self, ctx: QuantContext) -> None:
        inputs = ctx.layer_inputs() if self.needs_layer_inputs(ctx) else {}
        skipped: Counter[tuple[str, str]] = Counter()  # (side, frozen_by) -> count
        for name, q in ctx.qlayers.items():
            wq, aq = q.weight_quantizer, q.act_quantizer
            for side, qz in (("weight", wq), ("act", aq)):
                if qz is not None and qz.frozen:
                    skipped[side, qz.frozen_by] += 1
            if wq is not None and not wq.frozen:
                wq.fit(q.weight.data)
            if _static(aq):
                rec = inputs[name]
                aq.fit(rec["rows"], data_range=(rec["min"], rec["max"]))
            q.refresh()
        if skipped:
            by = ", ".join(f"{n} {side} by {who}" for (side, who), n in sorted(skipped.items()))
            log.info("rtn: kept %d frozen quantizer(s) as they are (%s)", sum(skipped.values()), by)
