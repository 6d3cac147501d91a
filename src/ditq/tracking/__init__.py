"""Results store, W&B logging, and tables laid out like the papers' tables.

Importing this package is light (no torch): Hydra's multirun callback lives here.
"""
