"""What a denoiser is conditioned on, in one object: class labels, prompts (text embeddings), or nothing.

Everywhere a condition travels (sampler, calibration records, block capture, caches, result rows)
it is a LongTensor `y` of *condition indices*, one per row:
  - class models: the class label; the null (guidance) index is the model's null class;
  - text models: the index of the prompt in the run's prompt pool (`Conditions.prompts(y)`), the
    null index -1 is the empty prompt; the adapter turns indices into text embeddings through a
    `TextBank` filled once per run (`ditq.conditioning.bank`), so records store an index, never a
    copy of the embeddings;
  - unconditional models: all zeros, no null index (guidance is refused).
An index is a function of the seed alone (`Conditions.for_seeds`), so FP and quantized runs stay
paired image by image.
"""
from ditq.conditioning.base import (  # noqa: F401
    ClassConditions,
    Conditions,
    NoConditions,
    PromptConditions,
    GuidanceError,
)
from ditq.conditioning.bank import TextBank  # noqa: F401
from ditq.conditioning.text import prepare_text  # noqa: F401
