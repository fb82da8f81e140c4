"""genforge: one Python stack for generative models, from raw data to a served API."""

__version__ = "0.1.0"
