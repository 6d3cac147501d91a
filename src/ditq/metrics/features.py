"""Feature spaces: a network plus its preprocessing, mapping uint8 NCHW images to feature vectors.

Each space says which outputs it has ("pool" for FID and Precision/Recall, "spatial" for sFID,
"logits" for IS and classification accuracy), the settings that pin it (recorded in every
result row) and a cache identity (settings + a digest of its weights file + code version).

  inception     the ditq port of the TF 2015 graph, ADM preprocessing (TF1 bilinear to 299,
                (x - 128) / 128); pool + spatial + logits in one pass.
  digits        the embedded digits classifier (64-d features, 10 logits) on 1x8x8 images.
  clean-fid     clean-fid's resizer (`cleanfid.resize.build_resizer(mode)`) and clean-fid's
                TorchScript Inception loaded through its own `InceptionV3W` wrapper; pool only.
  torchmetrics  the ditq port with the preprocessing of torchmetrics' `NoTrainInceptionV3`
                (torchmetrics 1.9): bilinear with antialias=True (F.interpolate) or, with
                antialias=False, TF1 bilinear; then (x - 128) / 128; pool only.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditq.metrics.errors import MetricInputError
from ditq.metrics.images import check_images, file_digest, to_rgb

FEATURES_VERSION = 1  # bump when extraction code changes what a cached feature holds
INCEPTION_WEIGHTS_ENV = "DITQ_INCEPTION_WEIGHTS"
CLEAN_FID_MODES = ("clean", "legacy_tensorflow")


def _torch_version() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def weights_digest(path: str | Path) -> str:
    """sha256 of a weights file (memoised by path, size and times, see ditq.utils.filehash)."""
    return file_digest(path)


def resolve_inception_path(path: str | os.PathLike | None) -> Path:
    """The pytorch-fid FID Inception weights file: the option, else $DITQ_INCEPTION_WEIGHTS."""
    from ditq.metrics.inception import WEIGHTS_FILENAME, WEIGHTS_URL

    chosen = path if path is not None else os.environ.get(INCEPTION_WEIGHTS_ENV)
    if chosen is None:
        raise MetricInputError(
            "Inception metrics need pytorch-fid's FID Inception weights "
            f"({WEIGHTS_FILENAME}, from {WEIGHTS_URL}); pass options={{'inception_path': ...}} "
            f"or set {INCEPTION_WEIGHTS_ENV}.")
    p = Path(chosen).expanduser()
    if not p.is_file():
        raise MetricInputError(f"Inception weights not found at {p}")
    return p


class FeatureSpace(ABC):
    """Base class. Subclasses set `name`, `outputs` and implement the abstract methods."""

    name: str = ""
    outputs: tuple[str, ...] = ()

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._loaded = False
        self.images_seen = 0  # images passed through the network (for tests of caching)

    # -- per space ------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Build the network and load its weights."""

    @abstractmethod
    def _run(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs for one batch of uint8 images."""

    @abstractmethod
    def settings(self) -> dict:
        """The pinned settings of this space (recorded in result rows and cache keys)."""

    @abstractmethod
    def weights_id(self) -> str:
        """A digest of the weights file."""

    def check_images(self, images: torch.Tensor, name: str) -> torch.Tensor:
        return check_images(images, name, channels=(1, 3))

    # -- shared ---------------------------------------------------------------------------
    def load(self) -> "FeatureSpace":
        """Build the network and load its weights (clear errors on missing or mismatched files)."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def cache_id(self) -> dict:
        return {"space": self.settings(), "weights_sha256": self.weights_id(),
                "features_version": FEATURES_VERSION, "torch": _torch_version()}

    def extract(self, images: torch.Tensor, batch_size: int = 250,
                outputs: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """All requested outputs for `images`, as float32 CPU tensors [N, D]."""
        self.check_images(images, "images")
        self.load()
        wanted = self.outputs if outputs is None else tuple(outputs)
        unknown = [o for o in wanted if o not in self.outputs]
        if unknown:
            raise MetricInputError(f"feature space {self.name!r} has no output {unknown}; it has {self.outputs}")
        parts: dict[str, list[torch.Tensor]] = {o: [] for o in wanted}
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                out = self._run(images[start:start + batch_size])
                for o in wanted:
                    parts[o].append(out[o].detach().to("cpu", torch.float32))
        self.images_seen += images.shape[0]
        return {o: torch.cat(v) for o, v in parts.items()}


class InceptionSpace(FeatureSpace):
    name = "inception"
    outputs = ("pool", "spatial", "logits")

    def __init__(self, weights_path=None, resize: str = "tf1", device: str = "cpu", flavour: str = "adm"):
        super().__init__(device)
        self._path_option = weights_path
        self.resize = resize
        self.flavour = flavour  # "adm" (ditq) or "torchmetrics": which library's preprocessing this replicates
        self.net = None

    @property
    def path(self) -> Path:
        return resolve_inception_path(self._path_option)

    def _load(self) -> None:
        from ditq.metrics.inception import load_inception

        self.net = load_inception(self.path, resize=self.resize, device=self.device)

    def _run(self, batch):
        out = self.net(to_rgb(batch).to(self.device))
        return {"pool": out.pool, "spatial": out.spatial, "logits": out.logits}

    def settings(self) -> dict:
        from ditq.metrics.inception import WEIGHTS_FILENAME

        return {"network": "inception-2015-12-05 (ditq port, pytorch-fid weight layout)",
                "weights_file": WEIGHTS_FILENAME, "preprocessing": self.flavour, "resize": self.resize,
                "input_size": 299, "normalisation": "(x-128)/128", "grey_to_rgb": "repeat"}

    def weights_id(self) -> str:
        return weights_digest(self.path)


class TorchmetricsSpace(InceptionSpace):
    """The features torchmetrics' FrechetInceptionDistance computes (its NoTrainInceptionV3)."""

    name = "torchmetrics"
    outputs = ("pool",)

    def __init__(self, weights_path=None, antialias: bool = False, device: str = "cpu"):
        super().__init__(weights_path, resize="bilinear-antialias" if antialias else "tf1", device=device,
                         flavour="torchmetrics")
        self.antialias = antialias

    def _run(self, batch):
        return {"pool": self.net(to_rgb(batch).to(self.device)).pool}

    def settings(self) -> dict:
        return {**super().settings(), "torchmetrics_antialias": self.antialias}


class DigitsSpace(FeatureSpace):
    name = "digits"
    outputs = ("pool", "spatial", "logits")

    def __init__(self, weights_path=None, device: str = "cpu"):
        super().__init__(device)
        from ditq.metrics.digits_net import DEFAULT_WEIGHTS

        self.path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
        self.net = None

    def _load(self) -> None:
        from ditq.metrics.digits_net import load_digits_classifier

        if not self.path.is_file():
            raise MetricInputError(f"digits classifier weights not found at {self.path}")
        try:
            self.net = load_digits_classifier(self.path).to(self.device)
        except (RuntimeError, KeyError, TypeError) as err:
            raise MetricInputError(f"digits classifier weights at {self.path} do not match the architecture: "
                                   f"{err}") from err

    def check_images(self, images, name):
        return check_images(images, name, channels=(1,), size=(8, 8))

    def _run(self, batch):
        from ditq.data.digits import from_uint8

        feats, spatial = self.net.features_and_spatial(from_uint8(batch).to(self.device))
        return {"pool": feats, "spatial": spatial, "logits": self.net.head(feats)}

    def settings(self) -> dict:
        return {"network": "ditq digits classifier", "weights_file": self.path.name, "input": "1x8x8, x/127.5-1"}

    def weights_id(self) -> str:
        return weights_digest(self.path)


class CleanFidSpace(FeatureSpace):
    """clean-fid's resizer and its TorchScript Inception through clean-fid's own wrapper."""

    name = "clean-fid"
    outputs = ("pool",)

    def __init__(self, model_path=None, mode: str = "clean", device: str = "cpu"):
        super().__init__(device)
        if mode not in CLEAN_FID_MODES:
            raise MetricInputError(f"clean_fid_mode must be one of {CLEAN_FID_MODES} (legacy_pytorch needs "
                                   f"torchvision, which ditq's environment excludes), got {mode!r}")
        self.mode = mode
        self._path_option = model_path
        self.model = None
        self.resizer: Callable | None = None

    @property
    def path(self) -> Path:
        from ditq.metrics.cleanfid_export import CLEANFID_FILENAME

        if self._path_option is None:
            raise MetricInputError("fid_backend='clean-fid' needs clean-fid's TorchScript Inception "
                                   f"({CLEANFID_FILENAME}); pass options={{'clean_fid_inception_path': ...}}")
        p = Path(self._path_option).expanduser()
        p = p / CLEANFID_FILENAME if p.is_dir() else p
        if p.name != CLEANFID_FILENAME:
            raise MetricInputError(f"clean-fid loads its network by the file name {CLEANFID_FILENAME}; got {p.name}")
        if not p.is_file():
            raise MetricInputError(f"clean-fid Inception not found at {p}")
        return p

    def _load(self) -> None:
        try:
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer
        except ImportError as err:
            raise MetricInputError(f"fid_backend='clean-fid' needs the clean-fid package: {err}") from err
        path = self.path
        try:
            model = InceptionV3W(str(path.parent), download=False, resize_inside=self.mode == "legacy_tensorflow")
        except Exception as err:  # noqa: BLE001 - torch.jit.load raises many types on a bad file
            raise MetricInputError(f"clean-fid Inception at {path} cannot be loaded: {err}") from err
        self.model = model.to(self.device).eval()
        self.resizer = build_resizer(self.mode)

    def _run(self, batch):
        hwc = to_rgb(batch).permute(0, 2, 3, 1).contiguous().numpy()
        resized = [np.asarray(self.resizer(img)) for img in hwc]
        # clean-fid's ResizeDataset: uint8 -> ToTensor()*255, float32 -> ToTensor() (no scaling)
        x = torch.from_numpy(np.stack(resized).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
        return {"pool": self.model(x.to(self.device))}

    def settings(self) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            cleanfid_version = version("clean-fid")
        except PackageNotFoundError:
            cleanfid_version = None
        return {"network": "clean-fid TorchScript inception-2015-12-05", "clean_fid_mode": self.mode,
                "resize": "PIL bicubic per channel, float, to 299" if self.mode == "clean" else "inside the network",
                "clean_fid_version": cleanfid_version}

    def weights_id(self) -> str:
        return weights_digest(self.path)


FEATURE_NETS = ("inception", "digits")


def build_feature_space(name: str, options: dict, device: str = "cpu") -> FeatureSpace:
    """The primary feature space of an Evaluator ("inception" or "digits")."""
    if name == "inception":
        return InceptionSpace(options.get("inception_path"), resize="tf1", device=device)
    if name == "digits":
        return DigitsSpace(options.get("digits_path"), device=device)
    raise MetricInputError(f"unknown feature_net {name!r}; choose one of {FEATURE_NETS}")
