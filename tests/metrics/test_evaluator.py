"""The Evaluator end to end: digits and (random-weight) Inception, caching, bad input, settings."""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from ditq.metrics import (
    Evaluator,
    FeatureStats,
    MetricInputError,
    Reference,
    available_metrics,
    inception_score,
    precision_recall,
    write_adm_reference,
)
from ditq.metrics.frechet import frechet_distance_from_features
from ditq.utils.cache import DiskCache

REQUIRED = {"fid", "sfid", "is", "precision", "recall", "psnr", "ssim", "lpips", "fid_to_fp", "cls_acc", "clip",
            "image_reward", "hpsv2"}


@pytest.fixture(scope="module")
def digit_sets(digits):
    images, labels = digits
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = perm[:600], perm[600:1200]
    noise = torch.randint(0, 256, (600, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref = Reference.from_images(images, {"dataset": "digits", "split": "all"}, labels)
    return {"ref": ref, "a": images[a], "a_labels": labels[a], "b": images[b], "noise": noise}


def test_available_metrics():
    assert REQUIRED <= set(available_metrics())


@pytest.mark.parametrize("kwargs, message", [
    ({"metrics": ["fid", "kid"]}, "unknown metric"),
    ({"metrics": []}, "non-empty"),
    ({"metrics": ["fid", "fid"]}, "twice"),
    ({"metrics": ["fid"], "options": {"fid_bakend": "ditq"}}, "unknown evaluator option"),
    ({"metrics": ["fid"], "options": {"fid_backend": "pytorch-fid"}}, "fid_backend"),
    ({"metrics": ["fid"], "options": {"clean_fid_mode": "legacy_pytorch"}}, "clean_fid_mode"),
    ({"metrics": ["is"], "options": {"is_splits_size": 0}}, "is_splits_size"),
    ({"metrics": ["fid"], "options": {"torchmetrics_antialias": "no"}}, "torchmetrics_antialias"),
    ({"metrics": ["cls_acc"], "feature_net": "inception"}, "cls_acc"),
    ({"metrics": ["fid"], "feature_net": "digits", "options": {"fid_backend": "clean-fid"}}, "inception"),
    ({"metrics": ["fid"], "feature_net": "clip"}, "feature_net"),
    ({"metrics": ["fid"], "batch_size": 0}, "batch_size"),
])
def test_construction_errors(kwargs, message):
    with pytest.raises(MetricInputError, match=message):
        Evaluator(**kwargs)


def test_digits_real_vs_real_and_noise(digit_sets):
    ev = Evaluator(["fid", "is", "precision", "recall", "cls_acc"], feature_net="digits")
    real = ev.evaluate(digit_sets["a"], labels=digit_sets["a_labels"], reference=digit_sets["ref"])
    noise = ev.evaluate(digit_sets["noise"], labels=digit_sets["a_labels"], reference=digit_sets["ref"])
    assert real["fid"] < 2.0 and noise["fid"] > 50.0
    assert real["precision"] > 0.95 and real["recall"] > 0.8
    assert noise["precision"] < 0.1 and noise["recall"] < 0.1
    assert real["cls_acc"] > 0.9 and noise["cls_acc"] < 0.3
    assert real["is"] > 5.0 and noise["is"] < 2.0
    # the numbers are the documented functions of the digits features
    feats = ev.space.extract(digit_sets["a"])
    ref_feats = ev.space.extract(digit_sets["ref"].images)
    f = FeatureStats.of(ref_feats["pool"]).gaussian().frechet_distance(FeatureStats.of(feats["pool"]).gaussian())
    assert real["fid"] == pytest.approx(f, rel=1e-10)
    assert real["is"] == pytest.approx(inception_score(feats["logits"]), rel=1e-12)
    assert (real["precision"], real["recall"]) == precision_recall(ref_feats["pool"], feats["pool"])


def test_paired_metrics_and_fp_self_skip(digit_sets):
    ev = Evaluator(["psnr", "ssim", "fid_to_fp", "fid"], feature_net="digits")
    out = ev.evaluate(digit_sets["a"], fp_images=digit_sets["b"], fp_spec={"model": "fp"}, reference=digit_sets["ref"])
    assert set(out) == {"psnr", "ssim", "fid_to_fp", "fid"}
    assert 0 < out["psnr"] < 30 and -1 <= out["ssim"] < 1 and out["fid_to_fp"] > 0
    same = ev.evaluate(digit_sets["b"], fp_images=digit_sets["b"], fp_spec={"model": "fp"}, reference=digit_sets["ref"])
    assert set(same) == {"fid"}
    assert ev.settings()["ssim"]["window_used"] == 7


def test_second_evaluation_reuses_cached_reference_and_fp_features(tmp_path, digit_sets):
    cache = DiskCache(tmp_path / "cache")
    metrics = ["fid", "precision", "fid_to_fp"]
    fp_spec = {"model": "tiny_dit_digits", "seeds": [0, 600], "sampler": "ddim4"}
    first = Evaluator(metrics, feature_net="digits", cache=cache)
    r1 = first.evaluate(digit_sets["a"], reference=digit_sets["ref"], fp_images=digit_sets["b"], fp_spec=fp_spec)
    assert first.counters["reference_builds"] == 1 and first.counters["fp_builds"] == 1
    assert first.counters["images_featurized"] == 1797 + 600 + 600

    # a second method (new evaluator, new process state), same reference and FP images
    second = Evaluator(metrics, feature_net="digits", cache=DiskCache(tmp_path / "cache"))
    r2 = second.evaluate(digit_sets["noise"], reference=digit_sets["ref"], fp_images=digit_sets["b"], fp_spec=fp_spec)
    assert second.counters == {"images_featurized": 600, "reference_builds": 0, "fp_builds": 0}
    assert r2["fid"] > r1["fid"]
    again = Evaluator(metrics, feature_net="digits", cache=DiskCache(tmp_path / "cache"))
    r3 = again.evaluate(digit_sets["a"], reference=digit_sets["ref"], fp_images=digit_sets["b"], fp_spec=fp_spec)
    assert r3 == r1

    # a different reference (other spec) or other FP images are not served from the cache
    other_ref = Reference.from_images(digit_sets["ref"].images, {"dataset": "digits", "split": "other"})
    third = Evaluator(metrics, feature_net="digits", cache=DiskCache(tmp_path / "cache"))
    third.evaluate(digit_sets["a"], reference=other_ref, fp_images=digit_sets["noise"], fp_spec=fp_spec)
    assert third.counters["reference_builds"] == 1 and third.counters["fp_builds"] == 1


def test_in_memory_reuse_without_disk_cache(digit_sets):
    ev = Evaluator(["fid"], feature_net="digits")
    ev.evaluate(digit_sets["a"], reference=digit_sets["ref"])
    ev.evaluate(digit_sets["b"], reference=digit_sets["ref"])
    assert ev.counters["reference_builds"] == 1


@pytest.mark.parametrize("call, message", [
    (lambda ev, d: ev.evaluate(d["a"].float(), labels=d["a_labels"], reference=d["ref"]), "uint8"),
    (lambda ev, d: ev.evaluate(d["a"].permute(0, 2, 3, 1), labels=d["a_labels"], reference=d["ref"]), "NHWC"),
    (lambda ev, d: ev.evaluate(d["a"][:, :, :4], labels=d["a_labels"], reference=d["ref"]), "8x8"),
    (lambda ev, d: ev.evaluate(d["a"].expand(-1, 3, -1, -1), labels=d["a_labels"], reference=d["ref"]), "1 channels"),
    (lambda ev, d: ev.evaluate(d["a"][:3].reshape(3, 1, 8, 8)[:0], labels=None, reference=d["ref"]), "at least 1"),
    (lambda ev, d: ev.evaluate(d["a"], labels=d["a_labels"][:10], reference=d["ref"]), "one per image"),
    (lambda ev, d: ev.evaluate(d["a"], labels=d["a_labels"]), "need a reference"),
    (lambda ev, d: ev.evaluate(d["a"], reference=d["ref"]), "need class labels"),
    (lambda ev, d: ev.evaluate(d["a"], labels=d["a_labels"], reference=d["ref"], fp_images=d["b"][:5]), "differ"),
    (lambda ev, d: ev.evaluate(d["a"], labels=d["a_labels"], reference=d["ref"], prompts=["a"] * 3), "3 prompts"),
    (lambda ev, d: ev.evaluate(d["a"], labels=d["a_labels"], reference="ref.npz"), "ditq.metrics.Reference"),
])
def test_bad_input_fails_before_any_feature_is_computed(digit_sets, call, message):
    ev = Evaluator(["fid", "cls_acc"], feature_net="digits")
    with pytest.raises(MetricInputError, match=message):
        call(ev, digit_sets)
    assert ev.counters["images_featurized"] == 0


def test_check_fails_fast(tmp_path, digit_sets, monkeypatch):
    ev = Evaluator(["fid", "psnr", "cls_acc"], feature_net="digits")
    with pytest.raises(MetricInputError, match=r"\['fid'\] need a reference.*\['psnr'\] need the FP.*labels"):
        ev.check(reference=None, has_prompts=False, has_fp_images=False, has_labels=False)
    ev.check(reference=digit_sets["ref"], has_prompts=False, has_fp_images=True, has_labels=True)
    # Inception weights: none given, a missing file, a file for another architecture
    monkeypatch.delenv("DITQ_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MetricInputError, match="pt_inception-2015-12-05"):
        Evaluator(["is"]).check(reference=None, has_prompts=False, has_fp_images=False, has_labels=False)
    with pytest.raises(MetricInputError, match="not found"):
        Evaluator(["is"], options={"inception_path": str(tmp_path / "missing.pth")}).check()
    from ditq.metrics.digits_net import DEFAULT_WEIGHTS
    with pytest.raises(MetricInputError, match="does not match the architecture"):
        Evaluator(["is"], options={"inception_path": str(DEFAULT_WEIGHTS)}).check()
    # a digits checkpoint that does not fit the digits architecture
    torch.save({"config": {"width": 8}, "state_dict": {"conv1.weight": torch.zeros(3)}}, tmp_path / "bad_digits.pt")
    with pytest.raises(MetricInputError, match="do not match"):
        Evaluator(["is"], feature_net="digits", options={"digits_path": str(tmp_path / "bad_digits.pt")}).check()
    with pytest.raises(MetricInputError, match="lpips_path"):
        Evaluator(["lpips"], feature_net="digits").check(reference=None, has_prompts=False, has_fp_images=True,
                                                          has_labels=False)


def test_reference_without_images_cannot_serve_precision(tmp_path, digit_sets):
    stats = FeatureStats.of(torch.randn(50, 64)).gaussian()
    ref = Reference.from_adm_npz(write_adm_reference(tmp_path / "stats.npz", None, stats))
    ev = Evaluator(["precision"], feature_net="digits")
    with pytest.raises(MetricInputError, match=r"\['precision'\] need reference images"):
        ev.check(reference=ref, has_prompts=False, has_fp_images=False, has_labels=False)


# ---------------------------------------------------------------------------------------------
# Inception (random weights): wiring of pool / spatial / logits, ADM reference statistics
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception_case(inception_weights, inception_net, make_images):
    ref_images = make_images(8, size=32, seed=10)
    samples = make_images(6, size=32, seed=11)
    ev = Evaluator(["fid", "sfid", "is", "precision", "recall"], options={
        "inception_path": str(inception_weights), "frechet_method": "eigh", "is_splits_size": 4})
    ref = Reference.from_images(ref_images, {"dataset": "smooth", "count": 8})
    out = ev.evaluate(samples, reference=ref)
    return {"ev": ev, "out": out, "ref": ref, "samples": samples, "net": inception_net,
            "ref_feats": inception_net(ref_images), "feats": inception_net(samples)}


def test_inception_metrics_are_the_documented_functions_of_the_features(inception_case):
    c = inception_case
    out, rf, sf = c["out"], c["ref_feats"], c["feats"]
    assert out["fid"] == pytest.approx(frechet_distance_from_features(rf.pool.numpy(), sf.pool.numpy()), rel=1e-6)
    sfid = frechet_distance_from_features(rf.spatial.numpy(), sf.spatial.numpy())
    assert out["sfid"] == pytest.approx(sfid, rel=1e-6)
    assert out["is"] == pytest.approx(inception_score(sf.logits, 4), rel=1e-6)
    p, r = precision_recall(rf.pool, sf.pool)
    assert (out["precision"], out["recall"]) == (pytest.approx(p), pytest.approx(r))
    assert c["ev"].counters["images_featurized"] == 14  # one pass over the samples serves all metrics
    s = c["ev"].settings()
    assert s["feature_space"]["resize"] == "tf1" and s["fid"]["fid_backend"] == "ditq"
    assert s["sfid"]["layer"].startswith("mixed_6/conv") and s["is"]["split_size"] == 4
    assert s["prec_recall"]["k"] == 3 and len(s["feature_space"]["weights_sha256"]) == 64


def test_adm_reference_statistics_are_used_for_fid_and_sfid(tmp_path, inception_case, inception_weights):
    """As in ADM: mu/sigma of the reference file define FID; its images serve Precision/Recall."""
    c = inception_case
    sf = c["feats"]
    pool, spatial = FeatureStats.of(sf.pool).gaussian(), FeatureStats.of(sf.spatial).gaussian()
    path = write_adm_reference(tmp_path / "ref.npz", c["ref"].images, pool, spatial)
    ev = Evaluator(["fid", "sfid", "precision"], options={"inception_path": str(inception_weights),
                                                          "frechet_method": "eigh"})
    out = ev.evaluate(c["samples"], reference=Reference.from_adm_npz(path))
    # the file's statistics are the samples' own (from the images the FIDs would be ~10^2 .. 10^3)
    assert abs(out["fid"]) < 1e-4 and abs(out["sfid"]) < 1e-4
    assert c["out"]["fid"] > 10 and c["out"]["sfid"] > 10
    assert out["precision"] == pytest.approx(c["out"]["precision"])


def test_torchmetrics_backend_is_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ditq.metrics.features import TorchmetricsSpace
    from ditq.metrics.fid_backends import FidBackend, TorchmetricsBackend, _PassThrough

    g = torch.Generator().manual_seed(3)
    ref, smp = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g) * 1.2 + 0.3
    backend = TorchmetricsBackend(TorchmetricsSpace(antialias=False), batch_size=64)
    direct = FrechetInceptionDistance(feature=_PassThrough(16), normalize=False)
    direct.update(ref.double(), real=True)
    direct.update(smp.double(), real=False)
    assert backend.distance(ref, smp) == pytest.approx(float(direct.compute()), rel=1e-12)
    assert backend.distance(ref, smp) == pytest.approx(FidBackend(None, method="sqrtm").distance(ref, smp), rel=1e-8)
    assert backend.settings()["torchmetrics_antialias"] is False


def test_clean_fid_space_runs_clean_fids_wrapper_and_resizer(tmp_path, inception_net, make_images):
    from cleanfid.resize import build_resizer

    from ditq.metrics.cleanfid_export import export_cleanfid_torchscript
    from ditq.metrics.features import CleanFidSpace

    export_cleanfid_torchscript(inception_net, tmp_path)
    images = make_images(3, size=40, seed=5)
    legacy = CleanFidSpace(tmp_path, mode="legacy_tensorflow").extract(images)["pool"]
    torch.testing.assert_close(legacy, inception_net(images).pool, rtol=1e-4, atol=1e-4)
    clean = CleanFidSpace(tmp_path / "inception-2015-12-05.pt", mode="clean").extract(images)["pool"]
    resize = build_resizer("clean")
    x = torch.from_numpy(np.stack([resize(im) for im in images.permute(0, 2, 3, 1).numpy()])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = inception_net.trunk((x.float() - 128) / 128).pool
    torch.testing.assert_close(clean, expected, rtol=1e-4, atol=1e-4)
    assert float((clean - legacy).abs().max()) > 1e-3  # bicubic PIL resize != TF1 bilinear
    with pytest.raises(MetricInputError, match="file name"):
        CleanFidSpace(tmp_path / "other.pt").load()
    ev = Evaluator(["fid"], options={"fid_backend": "clean-fid", "clean_fid_mode": "legacy_tensorflow",
                                     "clean_fid_inception_path": str(tmp_path)})
    s = ev.settings()["fid"]
    assert s["clean_fid_mode"] == "legacy_tensorflow" and s["fid_backend"] == "clean-fid"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["clean-fid", "torchmetrics"])
def test_alternative_backends_end_to_end(tmp_path, backend, inception_weights, inception_net, make_images):
    """2048-d sqrtm / eigvals: slow on CPU, hence marked."""
    from ditq.metrics.cleanfid_export import export_cleanfid_torchscript

    export_cleanfid_torchscript(inception_net, tmp_path)
    opts = {"fid_backend": backend, "inception_path": str(inception_weights),
            "clean_fid_inception_path": str(tmp_path), "clean_fid_mode": "legacy_tensorflow"}
    ref = Reference.from_images(make_images(12, seed=1), {"dataset": "smooth"})
    samples = make_images(10, seed=2)
    got = Evaluator(["fid"], options=opts).evaluate(samples, reference=ref)["fid"]
    ours = Evaluator(["fid"], options={"inception_path": str(inception_weights), "frechet_method": "eigh"}) \
        .evaluate(samples, reference=ref)["fid"]
    assert got == pytest.approx(ours, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# text-to-image scorers: lazy import and wiring (a scorer module stands in for the real one)
# ---------------------------------------------------------------------------------------------
class _LengthScorer:
    """Scores an image-prompt pair by the prompt length plus the image mean (known values)."""

    def __init__(self, model_id, device="cpu"):
        if model_id == "missing":
            raise OSError("no such model")
        self.model_id = model_id

    def score(self, images, prompts, batch_size):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return torch.tensor([len(p) + float(im.double().mean()) for im, p in zip(images, prompts)])

    def settings(self):
        return {"clip_model": self.model_id, "scorer": "length"}


def test_text_to_image_scorers_are_loaded_lazily_and_averaged(monkeypatch, digit_sets):
    module = types.ModuleType("ditq.metrics.clip_score")
    module.ClipScorer = _LengthScorer
    monkeypatch.setitem(sys.modules, "ditq.metrics.clip_score", module)
    images = digit_sets["a"][:4]
    prompts = ["a", "bb", "ccc", "dddd"]
    ev = Evaluator(["clip"], feature_net="digits", options={"clip_model": "openai/clip-vit-base-patch32"})
    out = ev.evaluate(images, prompts=prompts)
    expected = np.mean([len(p) + images[i].double().mean().item() for i, p in enumerate(prompts)])
    assert out["clip"] == pytest.approx(expected)
    assert ev.settings()["clip"] == {"clip_model": "openai/clip-vit-base-patch32", "scorer": "length"}
    with pytest.raises(MetricInputError, match="need prompts"):
        ev.evaluate(images)
    with pytest.raises(MetricInputError, match="cannot be built"):
        Evaluator(["clip"], options={"clip_model": "missing"}).check(has_prompts=True)


def test_missing_scorer_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ditq.metrics.hps", None)  # import fails
    with pytest.raises(MetricInputError, match="hpsv2.*HPSv2Scorer"):
        Evaluator(["hpsv2"]).check(has_prompts=True)


def test_psnr_is_infinite_only_for_identical_sets(digit_sets):
    ev = Evaluator(["psnr"], feature_net="digits")
    out = ev.evaluate(digit_sets["a"], fp_images=digit_sets["a"].clone())
    assert out["psnr"] == math.inf
