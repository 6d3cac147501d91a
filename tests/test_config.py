"""Config composition and validation: every group composes, bad input fails fast and clearly."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

from ditq.config import ConfigError, validate_config
from ditq.paths import config_dir

GROUPS = ["model", "method", "bits", "sampler", "dataset", "calib", "eval", "logger"]


def choices(group):
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_choice_of_every_group_validates(compose, group):
    for choice in choices(group):
        overrides = [f"{group}={choice}"]
        if group == "dataset" and choice == "imagenet":
            overrides.append("model=dit_xl_256")
        if group == "model" and choice.startswith("dit_xl"):
            overrides.append("dataset=imagenet")  # an ImageNet model is scored against ImageNet
        if group == "model" and choice.startswith(("pixart", "hunyuan")):  # text-to-image: a prompt set
            overrides += ["dataset=hpsv2", "dataset.prompts=/data/hpsv2_prompts", "eval=t2i"]
        if group == "model" and choice == "tiny_pixart_digits":
            overrides += ["dataset=digits_captions", "eval=digits_t2i"]
        unet_data = {"ddpm_cifar10_32": "cifar10", "ldm_celebahq_256": "celebahq",
                     "ldm_lsun_bedroom_256": "lsun_bedroom", "ldm_lsun_church_256": "lsun_church"}
        if group == "model" and choice == "tiny_unet_digits":  # unconditional: no labels, no guidance
            overrides += ["eval=digits_uncond", "sampler.cfg_scale=1.0"]
        if group == "model" and choice in unet_data:
            overrides += [f"dataset={unet_data[choice]}", "eval=adm", "sampler.cfg_scale=1.0"]
        if group == "dataset" and choice in unet_data.values():
            model = {v: k for k, v in unet_data.items()}[choice]
            overrides += [f"model={model}", "eval=adm", "sampler.cfg_scale=1.0"]
        if group == "dataset" and choice in ("digits_captions", "coco_captions", "hpsv2"):
            overrides += ["model=tiny_pixart_digits", "eval=digits_t2i"]
            if choice != "digits_captions":
                overrides += ["eval=t2i", f"dataset.prompts=/data/{choice}"]
        run = validate_config(compose(overrides))
        assert run.run_name  # derived from values


def test_run_name_derives_from_values(compose):
    run = validate_config(compose(["bits=w4a8", "sampler=ddim50", "eval.num_samples=123"]))
    assert run.run_name == "tiny_dit_digits-rtn-w4a8-ddim50-cfg1.5-n123"
    fp = validate_config(compose(["bits=fp"]))
    assert fp.run_name == "tiny_dit_digits-fp-ddim25-cfg1.5-n1000"


def test_unknown_group_choice_names_the_options(compose):
    with pytest.raises(MissingConfigException) as err:
        compose(["bits=w3a3"])
    msg = str(err.value)
    assert "bits" in msg and "w4a8" in msg and "w8a8" in msg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("bits.weight=fp4_e4m1", "bits.weight"),  # 1 + 4 + 1 = 6 bits, not 4
        ("bits.act=int0", "bits.act"),
        ("method.weight.granularity=per_token", "method.weight"),
        ("++method.weight.group_size=-3", "method.weight"),
        ("method.act.range=magic", "method.act"),
        ("method.layers=[qkv,attention]", "method.layers"),
        ("+method.weight.colour=red", "method.weight"),
        ("sampler.kind=euler", "sampler.kind"),
        ("sampler.cfg_scale=0.5", "sampler.cfg_scale"),
        ("eval.labels=sorted", "eval.labels"),
        ("calib.timesteps=some", "calib.timesteps"),
        ("calib.seed_start=0", "calib seeds overlap"),
        ("sampler.num_steps=abc", "sampler.num_steps"),
        ("+sampler.temperature=2", "sampler.temperature"),
        ("method.steps=[{name: magic}]", "magic"),
        ("method.steps=[{name: rtn, iters: 3}]", "iters"),
    ],
)
def test_bad_values_fail_naming_the_key(compose, override, needle):
    with pytest.raises(ConfigError) as err:
        validate_config(compose([override]))
    assert needle in str(err.value)


def test_impossible_format_lists_valid_choices(compose):
    with pytest.raises(ConfigError) as err:
        validate_config(compose(["bits.weight=fp4_e4m1"]))
    msg = str(err.value)
    assert "fp4_e2m1" in msg  # a valid 4-bit split is offered


def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ditq.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_bad_format_exits_before_torch_loads(tmp_path):
    # The check runs in the CLI process itself: it fails with a clear message and torch was
    # never imported (the cheap, deterministic witness of "fails in well under a second").
    code = (
        "import sys\n"
        "sys.argv = ['ditq', 'bits.weight=fp4_e4m1', 'hydra.run.dir=" + str(tmp_path) + "']\n"
        "from ditq.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "EXIT 2 False" in out.stdout, out.stdout + out.stderr
    assert "bits.weight" in out.stderr and "fp4_e4m1" in out.stderr


def test_cli_unknown_choice_exits_nonzero(tmp_path):
    out = _run_cli("method=nope", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "method" in out.stderr and "rtn" in out.stderr


def test_experiment_files_compose(compose):
    exps = sorted(p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
                  for p in (config_dir() / "experiment").rglob("*.yaml"))
    assert exps, "no experiment configs found"
    for exp in exps:
        cfg = compose([f"experiment={exp}"], return_hydra_config=True)
        run = validate_config(cfg)
        assert run.experiment == exp
        assert Path(config_dir() / "experiment" / f"{exp}.yaml").read_text().startswith("# @package _global_")
