"""Run-time preflight checks the torch-free config validation cannot do: output locations that
must be writable (checked before any work, so computed metrics are never lost to a bad path),
the reference against the model, and the loaded model against the config (right after load,
before any sampling). Every error is a ConfigError naming the key and the fix."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from ditq.config.schema import ConfigError


def check_writable(path: str | os.PathLike, key: str) -> Path:
    """Create `path` (a directory) and write and delete a probe file in it; ConfigError naming `key`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".ditq-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"{key}={str(path)!r} is not a writable directory ({type(err).__name__}: {err.strerror or err}); "
            f"the run would lose its results there after sampling and scoring. Point {key} at a directory "
            f"you can write (e.g. {key}=/tmp/ditq) or fix its permissions."
        ) from None
    return path


def check_outputs(run, output_dir: str | os.PathLike, sweep_dir: str | os.PathLike | None = None) -> None:
    """Every location the run writes to (the cache is checked by the cache itself)."""
    check_writable(output_dir, "hydra.run.dir (the run's output directory)" if sweep_dir is None
                   else "hydra.sweep.dir (the job's output directory)")
    if sweep_dir is not None:
        check_writable(sweep_dir, "hydra.sweep.dir")
    check_writable(run.paths.results_dir, "paths.results_dir")
    if run.logger.wandb and run.logger.mode != "disabled":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logger.wandb=true needs the wandb package; install it or use logger=none")
        check_writable(Path(output_dir) / "wandb", "the W&B directory <run dir>/wandb (logger.wandb=true)")


def check_reference(reference, run) -> None:
    """Reference images at another side than the model's images."""
    images = getattr(reference, "images", None)
    if images is not None and tuple(images.shape[-2:]) != (run.model.resolution, run.model.resolution):
        side = "x".join(str(s) for s in images.shape[-2:])
        raise ConfigError(
            f"the reference of dataset={run.dataset.name} has {side} images but model.resolution="
            f"{run.model.resolution} (model={run.model.name}); use the reference at the model's resolution "
            "(dataset.reference) or the dataset of this model"
        )


def check_loaded_model(adapter, run) -> None:
    """What only the loaded model knows: its training timesteps, channels and image side."""
    s, m = run.sampler, run.model
    trained = adapter.scheduler_config().get("num_train_timesteps")
    if trained is not None and s.num_steps > trained:
        raise ConfigError(f"sampler.num_steps={s.num_steps} exceeds the {trained} timesteps model {m.name} was "
                          f"trained with; set sampler.num_steps <= {trained}")
    channels = adapter.latent_shape[0]
    if m.cfg_channels is not None and m.cfg_channels > channels:
        raise ConfigError(f"model.cfg_channels={m.cfg_channels} exceeds the {channels} channels model {m.name} "
                          f"samples; set model.cfg_channels <= {channels} or null (all channels)")
    if getattr(adapter, "vae", None) is None and adapter.latent_shape[-1] != m.resolution:
        raise ConfigError(f"model.resolution={m.resolution} but model {m.name} samples "
                          f"{adapter.latent_shape[-1]}px images in pixel space; set model.resolution="
                          f"{adapter.latent_shape[-1]}")


def check_guidance(adapter, run) -> None:
    """Guidance needs an unconditional branch: refuse it (and unconditional calibration twins) for a
    model without one, before any sampling."""
    if adapter.null_index is not None:
        return
    if run.sampler.cfg_scale > 1:
        raise ConfigError(f"sampler.cfg_scale={run.sampler.cfg_scale} asks classifier-free guidance of model "
                          f"{run.model.name}, which has no unconditional embedding ({adapter.conditioning} "
                          "conditioning); set sampler.cfg_scale=1.0")
