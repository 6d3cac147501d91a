"""The training loop shared by the embedded diffusion models (ditq.train.loop)."""
import json

import pytest
import torch

from ditq.train.loop import alphas_cumprod, noised, train
from ditq.train.tiny_dit import SCHEDULE


def test_noised_is_the_forward_process_per_row():
    abar = alphas_cumprod(SCHEDULE)
    assert abar.shape == (1000,) and abar[0] > 0.999 and abar[-1] < 1e-4 and bool((abar[1:] < abar[:-1]).all())
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 500, 999])
    xt = noised(x0, t, noise, abar)
    for i in range(3):
        a = abar[t[i]]
        assert torch.allclose(xt[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i])


def test_train_steps_saves_and_keeps_an_ema():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ema = torch.nn.Linear(4, 1)
    ema.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    saved, lrs = [], []

    def lr_at(step):
        lrs.append(step)
        return 0.1

    train(model, ema, steps=5, lr_at=lr_at, loss_at=lambda step: torch.nn.functional.mse_loss(model(x), y),
          ema_decay=0.999, save_every=2, on_save=lambda step, running, s: saved.append((step, running)))
    assert [s for s, _ in saved] == [2, 4, 5] and all(r > 0 for _, r in saved)
    assert not torch.equal(ema.weight, model.weight)  # averaged, not copied
    assert not torch.allclose(ema.weight, torch.nn.Linear(4, 1).weight)


def test_tiny_unet_script_writes_the_hub_layout(tmp_path):
    from ditq.train.tiny_unet import main

    main(["--steps", "2", "--save-every", "1", "--batch-size", "8", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "train_meta.json").read_text())
    assert meta["steps"] == 2 and meta["final_loss_ema"] > 0
    assert (tmp_path / "unet" / "config.json").is_file() and (tmp_path / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.parametrize("script, own", [("tiny_dit", {"label_dropout": 0.2}), ("tiny_pixart", {"caption_dropout": 0.2}),
                                         ("tiny_unet", {"lr_schedule": "linear warm-up 200, cosine to 0.1x"})])
def test_every_training_script_takes_the_shared_options_and_records_them(tmp_path, script, own):
    import importlib

    main = importlib.import_module(f"ditq.train.{script}").main
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in own.items() if k != "lr_schedule"]
    threads = torch.get_num_threads()
    try:
        main(["--steps", "2", "--save-every", "2", "--batch-size", "4", "--lr", "1e-3", "--ema", "0.9",
              "--seed", "3", "--threads", "1", "--out", str(tmp_path), *extra])
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((tmp_path / "train_meta.json").read_text())
    assert {k: meta[k] for k in ("steps", "batch_size", "lr", "ema", "seed")} == \
           {"steps": 2, "batch_size": 4, "lr": 1e-3, "ema": 0.9, "seed": 3}
    assert {k: meta[k] for k in own} == own and "arch" in meta and meta["torch"] == torch.__version__
