"""Round-to-nearest: fit every weight quantizer on its weight and every static activation
quantizer on the layer's FP calibration inputs; no weight is changed."""
from __future__ import annotations

from ditq.methods.base import QuantContext, Step


def _static(q) -> bool:
    return q is not None and not q.cfg.dynamic


class RTN(Step):
    name = "rtn"

    def needs_layer_inputs(self, ctx: QuantContext) -> bool:
        return any(_static(q.act_quantizer) for q in ctx.qlayers.values())

    def apply(self, ctx: QuantContext) -> None:
        inputs = ctx.layer_inputs() if self.needs_layer_inputs(ctx) else {}
        for name, q in ctx.qlayers.items():
            if q.weight_quantizer is not None:
                q.weight_quantizer.fit(q.weight.data)
            if _static(q.act_quantizer):
                q.act_quantizer.fit(inputs[name])
            q.refresh()
