"""Device core of the edge MLOps agent: inference, model store, hot swap, drift, metrics."""

__version__ = "0.1.0"
