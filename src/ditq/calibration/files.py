"""A calibration set as a file a researcher keeps or shares (`calib.file`), as Q-DiT's
collect_cali_data.py writes one: the denoiser inputs recorded along the FP model's trajectories,
together with what produced them (model fingerprint, sampler, calibration settings, dtype).

A run with `calib.file=<path>` uses that file when it exists and writes it (atomically) when it
does not. A file made by another model, sampler, calibration setting or dtype is refused before any
sampling, with the differing fields named: calibration inputs of a DDIM-50 trajectory are not those
of a DDIM-25 one, and quantizing with them silently would give other numbers.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FILE_VERSION = 1


class CalibrationFileError(ValueError):
    """A calibration file that cannot be used for this run; the message names why and the fix."""


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{where}.{k}" if where else str(k)
            if k not in a or k not in b:
                out.append(f"{key}: {'missing in the file' if k not in a else 'not in this run'}")
            else:
                out += _diff(a[k], b[k], key)
        return out
    return [] if a == b else [f"{where}: file {a!r}, this run {b!r}"]


def read(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file gets the same advice)
        raise CalibrationFileError(f"calib.file={path} cannot be read ({type(err).__name__}: {err}); it is not a "
                                   "ditq calibration file or it is damaged: delete it (the run rebuilds it) or "
                                   "point calib.file elsewhere") from None
    if not isinstance(data, dict) or data.get("ditq_calibration") != FILE_VERSION or "records" not in data:
        raise CalibrationFileError(f"calib.file={path} is not a ditq calibration file (version {FILE_VERSION}); "
                                   "delete it or point calib.file elsewhere")
    return data


def check(path: str | Path, spec: dict) -> bool:
    """True when `path` exists and was made under `spec`; False when it does not exist yet; a file
    made under another spec raises CalibrationFileError naming the fields that differ."""
    path = Path(path)
    if not path.exists():
        return False
    made = read(path)["spec"]
    problems = _diff(made, spec)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CalibrationFileError(
            f"calib.file={path} was recorded under other settings than this run's ({shown}). Calibration "
            "inputs depend on the model, the sampler and the calibration settings: use a file made with "
            "this run's settings, delete this one to record it again, or set calib.file=null")
    return True


def load(path: str | Path, spec: dict) -> dict[str, torch.Tensor]:
    if not check(path, spec):
        raise CalibrationFileError(f"calib.file={path} does not exist")
    return read(path)["records"]


def save(path: str | Path, spec: dict, records: dict[str, torch.Tensor]) -> Path:
    """Write atomically: a temporary file in the same directory, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"ditq_calibration": FILE_VERSION, "spec": spec, "records": records}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
