"""QuantLinear / QuantConv2d: equivalence to the manual computation, weight caching, accounting."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditq.quant import QParams, QuantConv2d, QuantizerConfig, QuantLinear, build_quantizer


def Q(fmt="int8", gran="per_tensor", **kw):
    return QuantizerConfig(format=fmt, granularity=gran, **kw)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(96, 40)


PAIRS = [
    (Q("int8", "per_channel"), Q("int8", "per_token", dynamic=True)),
    (Q("int4", "per_group", group_size=32, symmetric=False), Q("int8", "per_token_group", group_size=32, dynamic=True, symmetric=False)),
    (Q("fp4_e2m1", "per_group", group_size=32), Q("fp4_e2m1", "per_token", dynamic=True)),
    (Q("mxfp4", "per_block"), Q("mxfp4", "per_block", dynamic=True)),
    (Q("nvfp4", "per_block"), Q("nvfp4", "per_block", dynamic=True)),
]


@pytest.mark.parametrize("wcfg, acfg", PAIRS)
def test_quant_linear_equals_manual_computation(linear, wcfg, acfg):
    wq, aq = build_quantizer(wcfg, "weight"), build_quantizer(acfg, "act")
    layer = QuantLinear(linear, wq, aq, name="blocks.0.fc1")
    x = torch.randn(2, 7, 96)
    expected = F.linear(aq(x), wq(linear.weight), linear.bias)
    assert torch.equal(layer(x), expected)


def test_none_quantizers_keep_full_precision(linear):
    x = torch.randn(3, 96)
    assert torch.equal(QuantLinear(linear, None, None)(x), linear(x))
    wq = build_quantizer(Q("int4", "per_channel"), "weight")
    only_w = QuantLinear(linear, wq, None)
    assert torch.equal(only_w(x), F.linear(x, wq(linear.weight), linear.bias))


def test_weight_is_quantized_once_and_cached(linear, monkeypatch):
    wq = build_quantizer(Q("int4", "per_channel"), "weight")
    calls = []
    original = type(wq).forward
    monkeypatch.setattr(type(wq), "forward", lambda self, t: calls.append(1) or original(self, t))
    layer = QuantLinear(linear, wq, None)
    assert calls == [] and not wq.is_fitted  # construction quantizes (and fits) nothing
    x = torch.randn(4, 96)
    for _ in range(3):
        layer(x)
    assert calls == [1]  # quantized at first use, then cached
    layer.refresh()
    assert calls == [1, 1]


def test_parameters_are_shared_and_refresh_follows_weight_updates(linear):
    wq = build_quantizer(Q("int4", "per_channel"), "weight")
    layer = QuantLinear(linear, wq, None)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    x = torch.randn(5, 96)
    layer(x)  # first use: the grid is fitted on the original weight and stored
    params = QParams(wq.scale.clone(), None)
    new_w = torch.randn(40, 96)
    layer.weight.data.copy_(new_w)  # what GPTQ / AdaRound do
    on_grid = F.linear(x, wq.quantize_with(new_w, params), layer.bias)
    assert not torch.equal(layer(x), on_grid)  # stale until refresh
    layer.refresh()
    assert torch.equal(layer(x), on_grid)  # re-rounded on the stored grid


def test_uncached_weight_gets_straight_through_gradients(linear):
    wq = build_quantizer(Q("int4", "per_channel", ste="identity"), "weight")
    layer = QuantLinear(linear, wq, None)
    layer.cache_weight = False
    x = torch.randn(5, 96)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(40, 96))


def test_state_dict_round_trip_refreshes_the_cache(linear):
    acfg = Q("int8", "per_tensor")
    src = QuantLinear(linear, build_quantizer(Q("int4", "per_channel"), "weight"), build_quantizer(acfg, "act"))
    src.act_quantizer.fit(torch.randn(64, 96))
    state = src.state_dict()
    assert "w_hat" not in state and "act_quantizer.scale" in state
    dst = QuantLinear(nn.Linear(96, 40), build_quantizer(Q("int4", "per_channel"), "weight"), build_quantizer(acfg, "act"))
    dst.load_state_dict(state)
    x = torch.randn(3, 96)
    assert torch.equal(dst(x), src(x))


def test_bits_per_weight(linear):
    cases = [
        (None, 32.0),
        (Q("int8", "per_channel"), 8 + 16 / 96),
        (Q("int4", "per_group", group_size=32, symmetric=False), 4 + (16 + 4) * 3 / 96),
        (Q("int4", "per_group", group_size=64, symmetric=False), 4 + (16 + 4) * 2 / 96),  # groups of 64 and 32
        (Q("int4", "per_group", group_size=512, symmetric=False), 4 + (16 + 4) / 96),  # one group per row
        (Q("fp4_e2m1", "per_tensor"), 4 + 16 / (40 * 96)),
        (Q("mxfp4", "per_block"), 4 + 8 * 3 / 96),
        (Q("nvfp4", "per_block"), 4 + 8 * 6 / 96 + 32 / (40 * 96)),
    ]
    for cfg, bits in cases:
        wq = None if cfg is None else build_quantizer(cfg, "weight")
        assert QuantLinear(linear, wq, None).bits_per_weight() == pytest.approx(bits)


def test_extra_repr_shows_formats(linear):
    layer = QuantLinear(
        linear,
        build_quantizer(Q("int4", "per_group", group_size=32, symmetric=False), "weight"),
        build_quantizer(Q("fp4_e2m1", "per_token", dynamic=True), "act"),
        name="blocks.3.attn.proj",
    )
    text = repr(layer)
    assert "name='blocks.3.attn.proj'" in text
    assert "w=[weight:uint4 zp per_group(32) minmax]" in text
    assert "a=[act:fp4_e2m1 per_token dynamic]" in text
    assert "a=[fp]" in repr(QuantLinear(linear, None, None))


@pytest.mark.parametrize("acfg", [
    Q("int8", "per_token", dynamic=True),
    Q("mxfp4", "per_block", dynamic=True),
    Q("int8", "per_channel"),
])
def test_quant_conv2d_equals_manual_computation(acfg):
    torch.manual_seed(1)
    conv = nn.Conv2d(32, 8, kernel_size=3, stride=2, padding=1)
    wq = build_quantizer(Q("int4", "per_channel", symmetric=False), "weight")
    aq = build_quantizer(acfg, "act")
    x = torch.randn(2, 32, 9, 9)
    if not acfg.dynamic:
        aq.fit(x.movedim(1, -1))
    layer = QuantConv2d(conv, wq, aq, name="x_embedder.proj")
    w_hat = wq(conv.weight.reshape(8, -1)).reshape(conv.weight.shape)  # per output channel on [out, in*kh*kw]
    x_hat = aq(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels last
    expected = F.conv2d(x_hat, w_hat, conv.bias, stride=2, padding=1)
    assert torch.equal(layer(x), expected)
    assert layer.bits_per_weight() == pytest.approx(4 + 20 / (32 * 9))
    assert "kernel_size=(3, 3)" in repr(layer) and "name='x_embedder.proj'" in repr(layer)


def test_quant_conv2d_rejects_other_padding_modes():
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        QuantConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


@pytest.mark.parametrize("wcfg, acfg", PAIRS)
def test_inference_path_with_the_reused_input_buffer(linear, wcfg, acfg):
    wq, aq = build_quantizer(wcfg, "weight"), build_quantizer(acfg, "act")
    layer = QuantLinear(linear, wq, aq)
    other = QuantLinear(nn.Linear(96, 40), build_quantizer(wcfg, "weight"), build_quantizer(acfg, "act"))
    x1, x2 = torch.randn(2, 7, 96), torch.randn(3, 5, 96) * 4
    with torch.no_grad():
        y1 = layer(x1)
        expected = F.linear(aq(x1), wq(linear.weight), linear.bias)
        y2 = other(x2)  # reuses the buffer; y1 must not change
    assert torch.equal(y1, expected)
    assert torch.equal(y2, F.linear(other.act_quantizer(x2), other.quantized_weight(), other.bias))
    layer.reuse_act_buffer = False
    with torch.no_grad():
        assert torch.equal(layer(x1), expected)


def test_hooked_activation_quantizer_outputs_stay_valid(linear):
    aq = build_quantizer(Q("int8", "per_token", dynamic=True), "act")
    layer = QuantLinear(linear, None, aq)
    seen = []
    aq.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x1, x2 = torch.randn(4, 96), torch.randn(4, 96)
    with torch.no_grad():
        layer(x1)
        layer(x2)
    assert torch.equal(seen[0], aq(x1)) and torch.equal(seen[1], aq(x2))


def test_quant_layers_pickle_and_deepcopy(linear, tmp_path):
    import copy

    layer = QuantLinear(linear, build_quantizer(Q("int4", "per_channel"), "weight"),
                        build_quantizer(Q("int8", "per_token", dynamic=True), "act"), name="fc")
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 96)
    assert torch.equal(loaded(x), layer(x)) and torch.equal(twin(x), layer(x))


def test_quant_enabled_switch_gives_the_full_precision_layer(linear):
    aq = build_quantizer(Q("int8"), "act")  # static and not fitted: must not even be called
    layer = QuantLinear(linear, build_quantizer(Q("int4", "per_channel"), "weight"), aq)
    x = torch.randn(4, 96)
    layer.quant_enabled = False
    assert torch.equal(layer(x), linear(x))
    conv = nn.Conv2d(8, 4, 3)
    qconv = QuantConv2d(conv, build_quantizer(Q("int4", "per_channel"), "weight"), build_quantizer(Q("int8"), "act"))
    qconv.quant_enabled = False
    xi = torch.randn(1, 8, 5, 5)
    assert torch.equal(qconv(xi), conv(xi))
    layer.quant_enabled = True
    with pytest.raises(RuntimeError, match="call fit"):
        layer(x)
