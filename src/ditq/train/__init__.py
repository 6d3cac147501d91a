"""Training scripts for the embedded models (their outputs ship in ditq/assets)."""
