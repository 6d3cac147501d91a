"""The Inception port against pytorch-fid, torch-fidelity and torchmetrics (fixtures made by
scripts/make_metric_fixtures.py in an isolated environment), its weight loading, and the TF1 resize.

Tolerances: the port folds batch norms into the convolutions, so its float32 features differ from
the references' in the last digits; measured max abs differences are ~1.5e-5 on features of
magnitude ~20 (relative ~1e-6). The tests allow 1e-4 abs / 1e-5 relative to the largest value.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditq.metrics import MetricInputError
from ditq.metrics.inception import (
    InceptionV3TF,
    load_inception,
    load_inception_state,
    random_inception_state_dict,
)
from ditq.metrics.random_weights import state_dict_checksum
from ditq.metrics.tf_resize import resize_bilinear_tf1

ABS_TOL = 1e-4
REL_TOL = 1e-5


def assert_features_close(ours, theirs, what):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, what
    err = np.abs(ours - theirs).max()
    assert err <= max(ABS_TOL, REL_TOL * np.abs(theirs).max()), f"{what}: max abs difference {err:.3g}"
    assert np.abs(theirs).max() > 1e-2, f"{what}: degenerate reference features"


@pytest.fixture(scope="module")
def oracle_net(oracle_meta):
    state = random_inception_state_dict(oracle_meta["seed"])
    assert state_dict_checksum(state) == pytest.approx(oracle_meta["inception_checksum"], rel=1e-12), \
        "random weights differ from the ones the fixture was made with"
    return load_inception_state(InceptionV3TF(), state)


def test_same_features_as_pytorch_fid(oracle_net, inception_fixture):
    small = torch.from_numpy(inception_fixture["small"])
    # pytorch-fid's own input path (resize_input, normalize_input), fed to both networks
    x299 = F.interpolate(small.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    assert float(x299.double().abs().sum()) == pytest.approx(float(inception_fixture["x299_checksum"]), rel=1e-12)
    with torch.no_grad():
        out = oracle_net.trunk(x299)
    assert_features_close(out.pool, inception_fixture["pfid_pool"], "pool_3")
    assert_features_close(out.logits, inception_fixture["pfid_logits_nobias"], "logits")
    # sFID layer: Mixed_6d.branch1x1, first 7 channels, flattened in TF's (H, W, C) order
    ref = torch.from_numpy(inception_fixture["pfid_mixed6d_1x1_c7"])
    assert ref.shape[1:] == (7, 17, 17)
    assert_features_close(out.spatial, ref.permute(0, 2, 3, 1).reshape(ref.shape[0], -1), "mixed_6/conv")


def test_uint8_path_matches_torch_fidelity_tf1_resize(oracle_net, inception_fixture):
    """torch-fidelity resizes like TF 1.x and normalises (x - 128) / 128: the ADM preprocessing."""
    rect = torch.from_numpy(inception_fixture["rect"])
    out = oracle_net(rect)
    assert_features_close(out.pool, inception_fixture["tfid_pool"], "pool_3 (torch-fidelity)")
    assert_features_close(out.logits, inception_fixture["tfid_logits_unbiased"], "logits (torch-fidelity)")
    assert_features_close(out.pool, inception_fixture["tm_pool_antialias_False"], "torchmetrics antialias=False")


def test_antialias_resize_matches_torchmetrics(oracle_net, inception_fixture):
    from ditq.metrics.features import TorchmetricsSpace

    rect = torch.from_numpy(inception_fixture["rect"])
    net = load_inception_state(InceptionV3TF(resize="bilinear-antialias"), oracle_net.state_dict())
    assert_features_close(net(rect).pool, inception_fixture["tm_pool_antialias_True"], "torchmetrics antialias=True")
    assert TorchmetricsSpace(antialias=True).resize == "bilinear-antialias"
    assert TorchmetricsSpace(antialias=False).resize == "tf1"


def test_state_dict_layout_is_pytorch_fids(oracle_meta):
    ours = {k: list(v.shape) for k, v in InceptionV3TF().state_dict().items()}
    assert ours == oracle_meta["pytorch_fid_state_dict_shapes"]


def test_loads_pytorch_fid_format_files_strictly(tmp_path, random_state, inception_weights):
    state = random_state
    net = load_inception(inception_weights)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    # torchvision-style files carry BN step counters; checkpoints may nest under "state_dict"
    nested = tmp_path / "nested.pth"
    counters = {k.replace("running_var", "num_batches_tracked"): torch.tensor(0)
                for k in state if k.endswith("running_var")}
    torch.save({"state_dict": {**state, **counters}}, nested)
    assert torch.equal(load_inception(nested).fc.weight, state["fc.weight"])


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("Mixed_6d.branch1x1.conv.weight"), "missing: Mixed_6d.branch1x1.conv.weight"),
    (lambda s: s.__setitem__("AuxLogits.fc.weight", torch.zeros(1000, 768)), "unexpected: AuxLogits.fc.weight"),
    (lambda s: s.__setitem__("fc.weight", torch.zeros(1000, 2048)),
     r"fc.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"),
])
def test_mismatched_checkpoint_is_a_clear_error(random_state, edit, message):
    state = dict(random_state)
    edit(state)
    with pytest.raises(MetricInputError, match=message):
        load_inception_state(InceptionV3TF(), state, "Inception weights")


def test_mismatched_checkpoint_file_is_a_clear_error(tmp_path, random_state):
    """A torchvision ImageNet Inception (1000 classes, aux head) is not the FID Inception."""
    state = {k: v for k, v in random_state.items() if not k.startswith("Mixed_7c")}
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "torchvision_like.pth"
    torch.save(state, path)
    expected = r"does not match the architecture: missing: Mixed_7c.*wrong shape: fc.weight"
    with pytest.raises(MetricInputError, match=expected):
        load_inception(path)


def test_missing_or_unreadable_weights(tmp_path):
    with pytest.raises(MetricInputError, match="not found"):
        load_inception(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MetricInputError, match="cannot be read"):
        load_inception(junk)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(MetricInputError, match="not a state dict"):
        load_inception(tmp_path / "list.pth")


def test_preprocessing_is_the_graphs():
    net = InceptionV3TF()
    x = net.preprocess(torch.full((1, 3, 299, 299), 128, dtype=torch.uint8))
    assert x.shape == (1, 3, 299, 299) and float(x.abs().max()) == 0.0
    x = net.preprocess(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 299, 2).contiguous())
    assert float(x.min()) == -1.0 and float(x.max()) == pytest.approx(127 / 128)
    with pytest.raises(MetricInputError):
        net.preprocess(torch.zeros(1, 3, 32, 32))
    with pytest.raises(MetricInputError, match="resize"):
        InceptionV3TF(resize="bicubic")


def test_folded_batch_norm_equals_unfolded(random_state):
    net = load_inception_state(InceptionV3TF(), random_state)
    conv = net.Mixed_6d.branch1x1
    x = torch.randn(2, 768, 17, 17, generator=torch.Generator().manual_seed(0))
    bn = conv.bn
    unfolded = F.relu((F.conv2d(x, conv.conv.weight) - bn.running_mean.view(1, -1, 1, 1))
                      / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(1, -1, 1, 1)
                      + bn.bias.view(1, -1, 1, 1))
    net.fold_batch_norms()
    torch.testing.assert_close(conv(x), unfolded, rtol=1e-5, atol=1e-5)
    # loading new weights clears the folded copy
    net.load_state_dict(random_state)
    assert conv.folded_weight is None


def test_tf1_resize_hand_computed():
    x = torch.tensor([[[[0.0, 10.0]]]])
    # TF1: source x = i * in/out = 0, .5, 1, 1.5 -> 0, 5, 10, 10 (PyTorch's half-pixel gives 0, 2.5, 7.5, 10)
    assert resize_bilinear_tf1(x, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    half_pixel = F.interpolate(x, size=(1, 4), mode="bilinear", align_corners=False)
    assert half_pixel.flatten().tolist() == [0.0, 2.5, 7.5, 10.0]
    y = torch.tensor([[[[0.0], [8.0], [16.0]]]])
    # downscale 3 -> 2: source y = 0, 1.5 -> 0, 12
    assert resize_bilinear_tf1(y, (2, 1)).flatten().tolist() == [0.0, 12.0]
    z = torch.rand(1, 3, 5, 7)
    assert resize_bilinear_tf1(z, (5, 7)) is z
