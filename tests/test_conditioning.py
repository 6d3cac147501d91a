"""The conditioning object: seed -> condition index, prompts, labels, null, bank lookups."""
import pytest
import torch

from ditq.conditioning import ClassConditions, GuidanceError, NoConditions, PromptConditions, TextBank
from ditq.data.captions import CAPTION_DIGITS, DIGIT_CAPTIONS, TEMPLATES, caption_index
from ditq.sampling import labels_for_seeds


def test_class_conditions_equal_the_label_stream():
    c = ClassConditions(10, null_index=10)
    seeds = list(range(37, 90))
    for mode in ("balanced", "random"):
        assert torch.equal(c.for_seeds(seeds, mode), labels_for_seeds(seeds, 10, mode))
    y = c.for_seeds(seeds)
    assert torch.equal(c.labels(y), y) and c.prompts(y) is None
    assert c.null_like(y).eq(10).all() and c.grid(y[:3]).tolist() == list(range(10))


def test_prompt_conditions_are_a_function_of_the_seed():
    c = PromptConditions("digits", DIGIT_CAPTIONS, labels=CAPTION_DIGITS)
    a = c.for_seeds(range(0, 300), "random")
    b = c.for_seeds(range(150, 160), "random")
    assert torch.equal(a[150:160], b)  # the same seed gets the same prompt whatever the others
    y = torch.tensor([caption_index(7, 0), -1])
    assert c.prompts(y) == ["a handwritten seven", ""]
    assert c.labels(y[:1]).tolist() == [7]
    assert c.null_like(y).eq(-1).all()
    bal = c.for_seeds(range(1000))
    assert torch.bincount(c.labels(bal), minlength=10).tolist() == [100] * 10  # balanced over digits
    assert c.spec()["digest"] != PromptConditions("x", DIGIT_CAPTIONS[:-1]).spec()["digest"]
    assert len(DIGIT_CAPTIONS) == 10 * len(TEMPLATES) and len(set(DIGIT_CAPTIONS)) == len(DIGIT_CAPTIONS)


def test_empty_prompt_set_and_unconditional_guidance_are_refused():
    with pytest.raises(ValueError, match="empty"):
        PromptConditions("none", [])
    n = NoConditions()
    y = n.for_seeds([3, 4, 5])
    assert y.tolist() == [0, 0, 0] and n.null_index is None
    with pytest.raises(GuidanceError, match="cfg_scale=1.0"):
        n.null_like(y)


def test_text_bank_lookup_missing_and_merge():
    bank = TextBank(torch.tensor([4, -1, 2]), torch.arange(3.0).view(3, 1, 1).expand(3, 2, 1).clone(),
                    torch.ones(3, 2, dtype=torch.long), extra={"pooled": torch.arange(3.0).view(3, 1)})
    e, m, extra = bank.lookup(torch.tensor([2, -1, 4, 4]))
    assert e[:, 0, 0].tolist() == [2.0, 1.0, 0.0, 0.0] and extra["pooled"].flatten().tolist() == [2.0, 1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match=r"prompt indices \[3\]"):
        bank.lookup(torch.tensor([3]))
    more = TextBank(torch.tensor([3, 2]), torch.full((2, 2, 1), 9.0), torch.ones(2, 2, dtype=torch.long),
                    extra={"pooled": torch.full((2, 1), 9.0)})
    merged = bank.merged(more)
    assert merged.index.tolist() == [-1, 2, 3, 4]
    assert merged.lookup(torch.tensor([2, 3]))[0][:, 0, 0].tolist() == [2.0, 9.0]  # existing rows kept


def test_sampler_refuses_guidance_without_a_null_condition():
    from types import SimpleNamespace

    from ditq.sampling import Sampler

    class Uncond:
        conditioning, device, latent_shape, cfg_channels = "none", torch.device("cpu"), (1, 2, 2), None
        conditions = NoConditions()
        null_index = None

        def denoise(self, x, t, y):
            return x

    s = Sampler(Uncond(), SimpleNamespace(cfg_scale=2.0))
    with pytest.raises(GuidanceError):
        s.guided_eps(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    s.cfg.cfg_scale = 1.0
    assert s.guided_eps(torch.ones(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)).sum() == 4
