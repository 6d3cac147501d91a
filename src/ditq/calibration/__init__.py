"""Calibration data: denoiser inputs along FP sampling trajectories, and per-layer inputs."""
from ditq.calibration.trajectories import collect_trajectory_inputs, select_steps  # noqa: F401
from ditq.calibration.layer_inputs import collect_layer_inputs  # noqa: F401
