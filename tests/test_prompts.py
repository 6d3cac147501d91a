"""Prompt datasets (ditq.data.prompts), the conditions of a run, and the cached text encoding
(ditq.conditioning.text.prepare_text)."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from ditq.conditioning import ClassConditions, NoConditions, PromptConditions, TextBank, prepare_text
from ditq.conditioning.encoder import TextEncoder, TextEncoderMismatchError
from ditq.config import ConfigError, validate_config
from ditq.config.schema import DatasetConfig
from ditq.data import prompts as P
from ditq.data.captions import CAPTION_DIGITS, DIGIT_CAPTIONS
from ditq.utils.cache import DiskCache

STYLES = ("anime", "concept-art", "paintings", "photo")


# -- pools ---------------------------------------------------------------------------------------
def test_digit_captions_pool_labels_and_seed_determinism():
    c = P.digit_caption_conditions()
    assert c.name == "digits_captions" and c.pool == list(DIGIT_CAPTIONS) and len(c) == 100
    y = torch.arange(len(c))
    assert c.labels(y).tolist() == list(CAPTION_DIGITS)
    assert c.prompts(torch.tensor([73, -1])) == [DIGIT_CAPTIONS[73], ""]
    assert "seven" in DIGIT_CAPTIONS[73] or "7" in DIGIT_CAPTIONS[73]
    seeds = list(range(250))
    assert c.for_seeds(seeds).tolist() == [s % 100 for s in seeds]  # balanced: every caption equally often
    r = c.for_seeds(seeds, "random")
    assert torch.equal(r, c.for_seeds(seeds, "random"))  # same seeds, same prompts
    assert c.for_seeds([17, 3, 99], "random").tolist() == [int(r[17]), int(r[3]), int(r[99])]  # a seed's own draw
    assert len(set(r.tolist())) > 50
    assert c.spec() == P.digit_caption_conditions().spec()


def _coco(tmp_path, n_images=20, name="captions_val2014.json"):
    images = [{"id": 1000 - 7 * k, "file_name": f"COCO_val2014_{1000 - 7 * k:012d}.jpg"} for k in range(n_images)]
    anns, aid = [], 500
    for im in reversed(images):  # annotations out of order on purpose
        for j in range(3):
            anns.append({"image_id": im["id"], "id": aid, "caption": f"  image {im['id']} caption {j} \n"})
            aid -= 1
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path, images


def test_coco_captions_order_strip_and_groups(tmp_path):
    path, images = _coco(tmp_path, n_images=4)
    c = P.coco_caption_conditions(path)
    assert isinstance(c, PromptConditions) and c.name == "coco_captions" and len(c) == 12
    ids = sorted(im["id"] for im in images)
    assert c.image_ids == [i for i in ids for _ in range(3)]
    assert c.groups is None and len(c.image_ids) == len(c.pool)
    # within an image, annotation id order: ids were assigned decreasing with j, so caption 2 comes first
    assert c.pool[:3] == [f"image {ids[0]} caption {j}" for j in (2, 1, 0)]
    assert all(p == p.strip() for p in c.pool)
    assert c.digest == P.coco_caption_conditions(path).digest


def test_coco_bad_files(tmp_path):
    missing = tmp_path / "nope" / "captions_train2017.json"
    with pytest.raises(FileNotFoundError, match="captions_train2017.json") as e:
        P.coco_caption_conditions(missing)
    assert "dataset.prompts" in str(e.value) and P.COCO_ANNOTATIONS_URL in str(e.value)
    bad = tmp_path / "corrupt.json"
    bad.write_text('{"annotations": [')
    with pytest.raises(ValueError, match="corrupt.json.*not valid JSON"):
        P.coco_caption_conditions(bad)
    empty = tmp_path / "instances.json"
    empty.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances.json.*holds no annotations"):
        P.coco_caption_conditions(empty)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"annotations": [{"image_id": 1, "id": 1}]}))
    with pytest.raises(ValueError, match="broken.json.*annotation #0"):
        P.coco_caption_conditions(broken)
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps({"annotations": [{"image_id": 1, "id": 1, "caption": "  "}]}))
    with pytest.raises(ValueError, match="only empty captions"):
        P.coco_caption_conditions(blank)


def test_coco_calibration_pairs(tmp_path):
    path, images = _coco(tmp_path)
    img_dir = tmp_path / "val2014"
    img_dir.mkdir()
    for im in images:
        (img_dir / im["file_name"]).write_bytes(b"jpg")
    pool = P.coco_caption_conditions(path)
    pairs = P.coco_calibration_pairs(path, img_dir, n=8, seed=3)
    assert len(pairs) == 8 and len({p.image for p in pairs}) == 8  # distinct images
    for p in pairs:
        assert p.image.is_file() and pool.pool[p.index] == p.caption
        assert p.image.name == f"COCO_val2014_{int(pool.image_ids[p.index]):012d}.jpg"  # the caption's own image
    assert pairs == P.coco_calibration_pairs(path, img_dir, n=8, seed=3)
    assert pairs != P.coco_calibration_pairs(path, img_dir, n=8, seed=4)
    assert len(P.coco_calibration_pairs(path, img_dir, n=20, seed=0)) == 20
    with pytest.raises(ValueError, match="n=21.*20 captioned images"):
        P.coco_calibration_pairs(path, img_dir, n=21)
    with pytest.raises(FileNotFoundError, match="dataset.images"):
        P.coco_calibration_pairs(path, tmp_path / "no_dir", n=2)
    first = P.coco_calibration_pairs(path, img_dir, n=20, seed=0)[0].image
    first.unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 20.*dataset.images") as e:
        P.coco_calibration_pairs(path, img_dir, n=20, seed=0)
    assert str(first) in str(e.value)


def _hps_dir(tmp_path, per_style):
    d = tmp_path / "hps"
    d.mkdir(exist_ok=True)
    for s in STYLES:
        (d / f"{s}.json").write_text(json.dumps([f"{s} prompt {i}" for i in range(per_style)]))
    return d


def test_hpsv2_conditions(tmp_path):
    from ditq.config.checks import HPS_STYLES
    from ditq.metrics.hps import HPS_STYLES as SCORER_STYLES

    assert HPS_STYLES == SCORER_STYLES == STYLES and DatasetConfig().styles == list(STYLES)  # torch-free copies agree
    d = _hps_dir(tmp_path, 3)
    c = P.hpsv2_conditions(d, prompts_per_style=3)
    assert c.name == "hpsv2" and len(c) == 12
    assert c.pool[:4] == ["anime prompt 0", "anime prompt 1", "anime prompt 2", "concept-art prompt 0"]
    assert c.groups == [s for s in STYLES for _ in range(3)]
    two = P.hpsv2_conditions(d, styles=["photo", "anime"], prompts_per_style=3)
    assert two.pool[0] == "photo prompt 0" and two.groups == ["photo"] * 3 + ["anime"] * 3
    with pytest.raises(ValueError, match="800"):  # the protocol's count by default
        P.hpsv2_conditions(d)
    with pytest.raises(ValueError, match="dataset.styles"):
        P.hpsv2_conditions(d, styles=["anime", "cartoon"], prompts_per_style=3)
    with pytest.raises(FileNotFoundError, match="dataset.prompts"):
        P.hpsv2_conditions(tmp_path / "absent", prompts_per_style=3)
    (d / "paintings.json").unlink()
    with pytest.raises(FileNotFoundError, match="paintings.json.*dataset.prompts"):
        P.hpsv2_conditions(d, prompts_per_style=3)


def test_prompt_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("a red cube\n\n  a blue sphere  \n")
    c = P.prompt_file_conditions(txt)
    assert c.pool == ["a red cube", "a blue sphere"] and c.name == "prompts:mine"
    js = tmp_path / "mine.json"
    js.write_text(json.dumps(["one", "two", "three"]))
    assert P.prompt_file_conditions(js).pool == ["one", "two", "three"]
    for name, text in (("empty.txt", ""), ("blank.txt", "\n  \n"), ("empty.json", "[]")):
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(ValueError, match=f"prompt file .*{name} holds no prompts"):
            P.prompt_file_conditions(f)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        P.prompt_file_conditions(tmp_path / "missing.txt")
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"prompts": ["a"]}))
    with pytest.raises(ValueError, match="list of strings"):
        P.prompt_file_conditions(obj)
    bad = tmp_path / "bad.json"
    bad.write_text("[\"a\",")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        P.prompt_file_conditions(bad)
    csv = tmp_path / "p.csv"
    csv.write_text("a\n")
    with pytest.raises(ValueError, match="unknown type"):
        P.prompt_file_conditions(csv)


# -- a run's conditions --------------------------------------------------------------------------
class _Cfg:
    def __init__(self, name):
        self.name = name


class FakeAdapter:
    """Counts text-encoder loads; `conditioning` as a real adapter's."""

    def __init__(self, conditioning="text", fingerprint=None, hook=True, name="fake_t2i"):
        self.conditioning, self.cfg = conditioning, _Cfg(name)
        self.num_classes, self.null_class = 10, 10
        self.fp = fingerprint or {"name": "fake", "weights": "abc"}
        self.loads, self.encoders, self.bank = 0, [], None
        if not hook:
            self.text_encoder_fingerprint = None

    @property
    def null_index(self):
        return -1 if self.conditioning == "text" else (self.null_class if self.conditioning == "class" else None)

    def text_encoder_fingerprint(self):
        return dict(self.fp)

    def text_encoder(self):
        self.loads += 1
        enc = FakeEncoder(self.fp)
        self.encoders.append(enc)
        return enc

    def set_text_bank(self, bank):
        self.bank = bank


class FakeEncoder(TextEncoder):
    name, max_tokens, hidden_size = "fake", 8, 4

    def __init__(self, fp, fail=False):
        self.fp, self.released, self.encoded, self.fail = dict(fp), 0, [], fail

    def fingerprint(self):
        return dict(self.fp)

    @staticmethod
    def row(p):
        g = torch.Generator().manual_seed(sum(map(ord, p)) * 31 + len(p))
        return torch.randn(max(len(p.split()), 1), 4, generator=g)

    def encode(self, prompts):
        if self.fail:
            raise RuntimeError("encoder exploded")
        self.encoded.extend(prompts)
        rows = [self.row(p) for p in prompts]
        L = max(r.shape[0] for r in rows)  # pads to the longest prompt of the batch
        embeds = torch.zeros(len(rows), L, 4)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            embeds[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"embeds": embeds, "mask": mask, "pooled": embeds.sum(1)}

    def release(self):
        self.released += 1


def _ds(kind, **kw):
    return OmegaConf.structured(DatasetConfig(name=kind, kind=kind, **kw))


def test_build_conditions_matrix(tmp_path):
    coco, _ = _coco(tmp_path, n_images=2)
    hps = _hps_dir(tmp_path, 800)
    txt = tmp_path / "p.txt"
    txt.write_text("x\ny\n")
    cls, t2i, unc = FakeAdapter("class"), FakeAdapter("text"), FakeAdapter("none")
    for kind in ("digits", "imagenet"):
        c = P.build_conditions(_ds(kind), cls)
        assert isinstance(c, ClassConditions) and c.num_classes == 10 and c.null_index == 10
        assert isinstance(P.build_conditions(_ds(kind), unc), NoConditions)
    c = P.build_conditions(_ds("digits_captions"), t2i)
    assert isinstance(c, PromptConditions) and c.name == "digits_captions" and c.class_of is not None
    assert len(P.build_conditions(_ds("coco_captions", prompts=str(coco)), t2i)) == 6
    h = P.build_conditions(_ds("hpsv2", prompts=str(hps)), t2i)
    assert len(h) == 3200 and h.groups[800] == "concept-art"
    assert P.build_conditions(_ds("prompts", prompts=str(txt)), t2i).pool == ["x", "y"]
    pre = P.load_prompt_pool(_ds("prompts", prompts=str(txt)))  # preflight reads it without a model
    assert P.build_conditions(_ds("prompts", prompts=str(txt)), t2i, pool=pre) is pre
    assert P.load_prompt_pool(_ds("digits")) is None
    with pytest.raises(ValueError, match="dataset=digits .*fake_t2i.*text-to-image.*dataset=digits_captions"):
        P.build_conditions(_ds("digits"), t2i)
    with pytest.raises(ValueError, match="dataset=digits_captions .*class-conditional.*dataset=digits for"):
        P.build_conditions(_ds("digits_captions"), cls)
    with pytest.raises(ValueError, match="dataset=coco_captions .*unconditional"):
        P.build_conditions(_ds("coco_captions", prompts=str(coco)), unc)
    with pytest.raises(FileNotFoundError, match="dataset.prompts"):
        P.build_conditions(_ds("coco_captions", prompts=str(tmp_path / "gone.json")), t2i)
    assert P.uses_real_digits("digits_captions") and P.uses_real_digits("digits")
    assert not P.uses_real_digits("coco_captions")


T2I = ["model.family=pixart"]  # the 8x8 model config as a text-to-image family (config checks only, nothing loads)


def test_config_checks_of_prompt_datasets(compose):
    with pytest.raises(ConfigError, match="coco_captions.*needs dataset.prompts.*annotations_trainval2017.zip"):
        validate_config(compose(T2I + ["dataset=coco_captions"]))
    run = validate_config(compose(T2I + ["dataset=coco_captions", "dataset.prompts=/data/captions_val2014.json"]))
    assert run.dataset.kind == "coco_captions" and run.dataset.prompts.endswith("captions_val2014.json")
    assert validate_config(compose(T2I + ["dataset=digits_captions"])).dataset.kind == "digits_captions"
    assert list(validate_config(compose(T2I + ["dataset=hpsv2"])).dataset.styles) == list(STYLES)
    for overrides, needle in (
            (T2I + ["dataset=digits_captions", "dataset.reference=/x.npz"], "dataset.reference.*digits_captions"),
            (T2I + ["dataset=digits_captions", "+dataset.prompts=/x.txt"], "dataset.prompts.*built in"),
            (["dataset=digits", "+dataset.prompts=/x.txt"], "dataset.prompts.*not a prompt dataset"),
            (["dataset=digits", "+dataset.images=/imgs"], "dataset.images.*coco_captions"),
            (T2I + ["dataset=hpsv2", "dataset.styles=[anime,cartoon]"], "dataset.styles.*cartoon"),
            (T2I + ["dataset=hpsv2", "dataset.prompts=null"], "needs dataset.prompts"),
            (["dataset=digits", "dataset.kind=captions"], "dataset.kind"),
            # model and dataset that do not pair: refused before any model loads
            (["dataset=digits_captions"], "dataset=digits_captions .*prompt dataset.*tiny_dit_digits.*class-cond"),
            (T2I + ["dataset=digits"], "model=tiny_dit_digits is text-to-image.*dataset=digits_captions")):
        with pytest.raises(ConfigError, match=needle):
            validate_config(compose(overrides))


# -- prepare_text --------------------------------------------------------------------------------
def test_prepare_text_caches_and_frees_the_encoder(tmp_path):
    cond = P.digit_caption_conditions()
    cache = DiskCache(tmp_path / "cache")
    a = FakeAdapter()
    bank = prepare_text(a, cond, torch.tensor([5, 3, 5, 42]), cache=cache, progress=False, batch_size=2)
    assert a.loads == 1 and a.encoders[0].released == 1 and a.bank is bank
    assert bank.index.tolist() == [-1, 3, 5, 42] and bank.encoder == a.fp
    assert bank.stats["cached"] is False and bank.stats["encoder_loaded"] and bank.stats["encode_s"] >= 0
    assert sorted(a.encoders[0].encoded) == sorted(["", cond.pool[3], cond.pool[5], cond.pool[42]])  # each once
    # rows: the encoder's own output, zero-padded across batches, mask 0 on padding
    e, m, extra = bank.lookup(torch.tensor([42, -1, 42]))
    r = FakeEncoder.row(cond.pool[42])
    assert torch.equal(e[0, :len(r)], r) and m[0].sum() == len(r) and torch.all(e[0, len(r):] == 0)
    assert torch.equal(e[0], e[2]) and m[1].sum() == 1 and torch.allclose(extra["pooled"][0], r.sum(0))
    assert len(list((tmp_path / "cache" / "text_embeddings").glob("*.pt"))) == 1

    b = FakeAdapter()  # a new run on the same prompts: nothing loads
    again = prepare_text(b, cond, [42, 3, 5], cache=cache, progress=False)
    assert b.loads == 0 and again.stats["cached"] is True and not again.stats["encoder_loaded"]
    assert b.bank is again and torch.equal(again.embeds, bank.embeds) and torch.equal(again.mask, bank.mask)
    assert torch.equal(again.extra["pooled"], bank.extra["pooled"])

    c = FakeAdapter()  # other prompts: a new entry
    other = prepare_text(c, cond, [7], cache=cache, progress=False)
    assert c.loads == 1 and c.encoders[0].released == 1 and other.index.tolist() == [-1, 7]
    assert len(list((tmp_path / "cache" / "text_embeddings").glob("*.pt"))) == 2
    d = FakeAdapter(fingerprint={"name": "fake", "weights": "other"})  # another encoder: a new entry
    prepare_text(d, cond, [42, 3, 5], cache=cache, progress=False)
    assert d.loads == 1 and len(list((tmp_path / "cache" / "text_embeddings").glob("*.pt"))) == 3


def test_prepare_text_without_fingerprint_hook_loads_but_does_not_encode_on_hit(tmp_path):
    cond, cache = P.digit_caption_conditions(), DiskCache(tmp_path)
    prepare_text(FakeAdapter(), cond, [1, 2], cache=cache, progress=False)
    a = FakeAdapter(hook=False)
    bank = prepare_text(a, cond, [2, 1], cache=cache, progress=False)
    assert bank.stats["cached"] and a.loads == 1 and a.encoders[0].encoded == [] and a.encoders[0].released == 1
    b = FakeAdapter(hook=False)  # no cache: loaded once, fingerprint and encode from the same instance
    prepare_text(b, cond, [1], cache=None, progress=False)
    assert b.loads == 1 and b.encoders[0].released == 1 and len(b.encoders[0].encoded) == 2


def test_prepare_text_errors_release_the_encoder(tmp_path):
    cond = P.digit_caption_conditions()
    a = FakeAdapter()
    a.text_encoder_fingerprint = lambda: {"name": "fake", "weights": "stale"}  # lies about the loaded encoder
    with pytest.raises(TextEncoderMismatchError, match="text_encoder_fingerprint"):
        prepare_text(a, cond, [0], cache=DiskCache(tmp_path), progress=False)
    assert a.encoders[0].released == 1 and not list(tmp_path.rglob("*.pt"))
    b = FakeAdapter()
    b.text_encoder = lambda: b.encoders.append(FakeEncoder(b.fp, fail=True)) or b.encoders[-1]
    with pytest.raises(RuntimeError, match="exploded"):
        prepare_text(b, cond, [0], cache=None, progress=False)
    assert b.encoders[0].released == 1
    with pytest.raises(ValueError, match=r"\[-2, 100\].*100 prompts"):
        prepare_text(FakeAdapter(), cond, [100, -2, 4], progress=False)
    with pytest.raises(ValueError, match="prompt conditions"):
        prepare_text(FakeAdapter(), ClassConditions(10, 10), [1], progress=False)


def test_bank_lookup_of_unprepared_index_names_prepare_text(tmp_path):
    bank = prepare_text(FakeAdapter(), P.digit_caption_conditions(), [4], progress=False)
    assert isinstance(bank, TextBank) and len(bank) == 2
    with pytest.raises(KeyError, match="prepare_text"):
        bank.lookup(torch.tensor([5]))
