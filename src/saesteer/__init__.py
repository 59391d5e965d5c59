"""saesteer: steer chat models to refuse harmful requests with sparse-autoencoder features, and measure the cost.

The pipeline's stages are subpackages, each importable on its own: ``core`` → ``models`` → ``data`` →
``activations`` → ``sae`` → ``features`` → ``steering`` → ``generation`` → ``evals`` → ``gating`` →
``experiments`` → ``serve``; ``cli`` is the command line over them (docs/ARCHITECTURE.md).
"""

__version__ = "0.1.0"
