"""Format names, config validation, and the torch-free import of ditq.quant.spec."""
import subprocess
import sys

import pytest

from ditq.quant.spec import (
    FormatError,
    QuantizerConfig,
    available_formats,
    parse_format,
    validate_quantizer_config,
)


@pytest.mark.parametrize(
    "name, family, bits, e, m, signed, block, zp",
    [
        ("int4", "int", 4, None, None, True, None, False),
        ("uint8", "int", 8, None, None, False, None, True),
        ("fp4_e2m1", "fp", 4, 2, 1, True, None, False),
        ("fp4_e3m0", "fp", 4, 3, 0, True, None, False),
        ("fp4_e1m2", "fp", 4, 1, 2, True, None, False),
        ("ufp4_e3m1", "ufp", 4, 3, 1, False, None, True),
        ("ufp4_e4m0", "ufp", 4, 4, 0, False, None, True),
        ("ocp_e4m3", "ocp", 8, 4, 3, True, None, False),
        ("ocp_e5m2", "ocp", 8, 5, 2, True, None, False),
        ("mxfp4", "mx", 4, 2, 1, True, 32, False),
        ("mxfp6_e3m2", "mx", 6, 3, 2, True, 32, False),
        ("mxint8", "mx", 8, None, None, True, 32, False),
        ("nvfp4", "nvfp4", 4, 2, 1, True, 16, False),
    ],
)
def test_parse_known_names(name, family, bits, e, m, signed, block, zp):
    spec = parse_format(name)
    assert (spec.name, spec.family, spec.bits) == (name, family, bits)
    assert (spec.exponent_bits, spec.mantissa_bits, spec.signed) == (e, m, signed)
    assert (spec.block_size, spec.needs_zero_point) == (block, zp)


@pytest.mark.parametrize(
    "alias, canonical",
    [("mxfp4_e2m1", "mxfp4"), ("ocp_e4m3fn", "ocp_e4m3"), ("fp8_e4m3fn", "ocp_e4m3"), (" INT4 ", "int4")],
)
def test_aliases_and_case(alias, canonical):
    assert parse_format(alias).name == canonical


def test_scaled_e4m3_is_not_the_ocp_one():
    # fp8_e4m3 is the all-finite scaled grid (max 480 on the unit grid); ocp_e4m3 reserves NaN (max 448)
    assert parse_format("fp8_e4m3").family == "fp"
    assert parse_format("fp8_e4m3fn").family == "ocp"


def test_available_formats_all_parse_and_cover_families():
    names = available_formats()
    assert len(names) == len(set(names))
    specs = [parse_format(n) for n in names]
    assert [s.name for s in specs] == names
    assert {s.family for s in specs} == {"int", "fp", "ufp", "ocp", "mx", "nvfp4"}
    for n in ("int2", "int8", "uint4", "fp3_e1m1", "fp8_e7m0", "ufp4_e3m1", "ocp_e2m1", "mxint8", "nvfp4"):
        assert n in names


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("fp4_e4m1", "1 sign + 4 exponent + 1 mantissa bits = 6, not 4"),
        ("ufp4_e2m1", "2 exponent + 1 mantissa bits = 3, not 4"),
        ("fp4_e0m3", "at least 1 exponent bit"),
        ("int1", "2..16 bits, not 1"),
        ("int17", "2..16 bits, not 17"),
        ("fp9_e8m0", "at most 7 exponent bits"),
        ("fp17_e5m11", "2..16 bits, not 17"),
        ("float4", "unknown name"),
        ("", "unknown name"),
    ],
)
def test_parse_errors_name_the_string_the_reason_and_the_choices(bad, fragment):
    with pytest.raises(FormatError) as err:
        parse_format(bad)
    msg = str(err.value)
    assert repr(bad) in msg
    assert fragment in msg
    assert "int{b}" in msg and "fp{n}_e{E}m{M}" in msg and "nvfp4" in msg  # the naming pattern + examples


def test_parse_error_suggests_close_names():
    with pytest.raises(FormatError, match="Did you mean.*mxfp4"):
        parse_format("mxpf4")


def test_parse_rejects_non_strings():
    with pytest.raises(FormatError, match="must be a string"):
        parse_format(4)


# ----------------------------------------------------------------------------- validation
def _ok(role, **kw):
    validate_quantizer_config(QuantizerConfig(**kw), role)


@pytest.mark.parametrize(
    "role, kw",
    [
        ("weight", dict(format="int4", granularity="per_group", group_size=128, symmetric=False)),
        ("weight", dict(format="fp4_e2m1", granularity="per_channel", range="mse")),
        ("weight", dict(format="mxfp4", granularity="per_block")),
        ("weight", dict(format="nvfp4", granularity="per_block", group_size=16)),
        ("act", dict(format="int8", granularity="per_token_group", group_size=64, symmetric=False, dynamic=True)),
        ("act", dict(format="int8", granularity="per_tensor", range="percentile")),
        ("act", dict(format="int8", granularity="per_channel")),
        ("act", dict(format="ufp4_e3m1", granularity="per_token", symmetric=False, dynamic=True)),
        ("act", dict(format="nvfp4", granularity="per_block")),  # static tensor scale, dynamic blocks
        ("act", dict(format="mxfp8_e4m3", granularity="per_block", dynamic=True)),
    ],
)
def test_valid_configs_pass(role, kw):
    _ok(role, **kw)


@pytest.mark.parametrize(
    "role, kw, fragment",
    [
        ("weight", dict(format="int4", granularity="per_group"), "group_size=None: per_group needs a group_size"),
        ("weight", dict(format="int4", granularity="per_group", group_size=0), "group_size=0: must be a positive"),
        ("act", dict(format="int4", granularity="per_token_group", group_size=-8, dynamic=True), "group_size=-8"),
        ("weight", dict(format="int4", granularity="per_channel", group_size=64), "only used with per_group"),
        ("weight", dict(format="int8", dynamic=True), "dynamic=True: weights are quantized once"),
        ("weight", dict(format="int8", granularity="per_token"), "is for activations"),
        ("act", dict(format="int8", granularity="per_group", group_size=8), "per_group'?: is for weights"),
        ("act", dict(format="int8", granularity="per_token"), "dynamic=False: per_token ranges depend on each token"),
        ("act", dict(format="int8", granularity="per_channel", dynamic=True), "come from calibration"),
        ("act", dict(format="int8", granularity="per_token", dynamic=True, range="mse"), "range='mse': dynamic ranges"),
        ("weight", dict(format="int8", range="kl"), "unknown range method"),
        ("weight", dict(format="int8", granularity="per_row"), "granularity='per_row': unknown"),
        ("weight", dict(format="mxfp4"), "set granularity: per_block"),
        ("weight", dict(format="nvfp4", granularity="per_group", group_size=16), "set granularity: per_block"),
        ("weight", dict(format="nvfp4", granularity="per_block", group_size=32), "group_size=32"),
        ("weight", dict(format="mxfp4", granularity="per_block", range="mse"), "absmax; use minmax"),
        ("act", dict(format="mxfp4", granularity="per_block"), "set dynamic: true"),
        ("weight", dict(format="mxfp4", granularity="per_block", symmetric=False), "no zero point"),
        ("weight", dict(format="int4", granularity="per_block"), "per_block is for block formats"),
        ("weight", dict(format="fp4_e2m1", symmetric=False), "ufp4_e3m1 or ufp4_e2m2"),
        ("weight", dict(format="ocp_e4m3", symmetric=False), "unsigned format with zero point"),
        ("weight", dict(format="ufp4_e3m1"), "set symmetric: false"),
        ("weight", dict(format="uint4"), "set symmetric: false"),
        ("weight", dict(format="int4", percentile=0.0), "percentile=0.0"),
        ("weight", dict(format="int4", clip_search_points=0), "clip_search_points=0"),
        ("weight", dict(format="int4", clip_min_ratio=1.5), "clip_min_ratio=1.5"),
        ("weight", dict(format="int4", clip_norm=0.0), "clip_norm=0.0"),
        ("weight", dict(format="int4", ste="soft"), "ste='soft'"),
        ("weight", dict(format="int4", eps=0.0), "eps=0.0"),
        ("weight", dict(format="fp4_e4m1"), "= 6, not 4"),
    ],
)
def test_invalid_configs_name_the_field(role, kw, fragment):
    with pytest.raises(FormatError, match=fragment):
        _ok(role, **kw)


def test_unknown_role():
    with pytest.raises(FormatError, match="role must be one of"):
        validate_quantizer_config(QuantizerConfig(format="int8"), "bias")


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_spec_imports_without_torch():
    code = (
        "import sys\n"
        "from ditq.quant.spec import parse_format, validate_quantizer_config, QuantizerConfig\n"
        "from ditq.quant import parse_format as p2, FormatError\n"
        "validate_quantizer_config(QuantizerConfig(format='int4', granularity='per_group', group_size=64), 'weight')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from ditq.quant import get_format\n"
        "assert 'torch' in sys.modules\n"
    )
    res = _fresh_python(code)
    assert res.returncode == 0, res.stderr


def test_config_works_as_a_hydra_structured_schema():
    omegaconf = pytest.importorskip("omegaconf")
    schema = omegaconf.OmegaConf.structured(QuantizerConfig)
    assert omegaconf.OmegaConf.is_missing(schema, "format")  # required
    cfg = omegaconf.OmegaConf.merge(schema, {"format": "int4", "granularity": "per_group", "group_size": 64})
    validate_quantizer_config(cfg, "weight")
    with pytest.raises(FormatError, match="group_size=None"):
        validate_quantizer_config(omegaconf.OmegaConf.merge(schema, {"format": "int4", "granularity": "per_group"}), "weight")
    from ditq.quant import build_quantizer

    assert build_quantizer(cfg, "weight").group_size == 64
