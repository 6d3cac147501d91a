"""Config schemas (dataclasses) and validation. Torch-free: a bad config fails before heavy imports."""
from ditq.config.resolvers import register_resolvers
from ditq.config.schema import ConfigError, RunConfig, validate_config  # noqa: F401

register_resolvers()
