"""Analysis helpers behind the notebooks in `notebooks/` (activations, formats, sensitivity, sweeps).

Each function is small and tested (tests/test_notebooks.py), so a notebook is a parameters cell
plus calls and plots:
  embedded     compose/validate a run config, load the model and sampler, run one or a grid of runs
  activations  per-layer, per-timestep input statistics on calibration trajectories; Hadamard rotation
  formats      value grids of INT/FP/block formats; quantization error at the MSE-optimal scale
  sensitivity  a run's per-layer / per-timestep errors from its diagnostics table
  sweeps       result rows as a flat frame; pivots (method x bits -> metric)
  plots        the notebooks' figures, each on a given matplotlib Axes
  notebook     execute a notebook with parameters injected after its `parameters` cell (nbclient)
Submodules load on import of the submodule, so `import ditq.analysis` stays light."""
