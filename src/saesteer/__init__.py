"""saesteer: steer chat models to refuse harmful requests with sparse-autoencoder features, and measure the cost."""

__version__ = "0.1.0"

from .utils import SaesteerError  # noqa: E402,F401
