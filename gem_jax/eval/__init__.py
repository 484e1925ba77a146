"""Benchmark evaluation: dataset readers, metrics, protocols and the evaluation runner."""

from gem_jax.eval.datasets import READERS, Dataset, DatasetError, Points, Sample, open_dataset
from gem_jax.eval.protocols import (CLEARCLIP_PROTOCOL, GEM_PROTOCOL, MASKCLIP_PROTOCOL, NACLIP_PROTOCOL, PROTOCOLS,
                                    SCLIP_PROTOCOL, Protocol, get_protocol)

__all__ = [
    "READERS", "Dataset", "DatasetError", "Points", "Sample", "open_dataset",
    "GEM_PROTOCOL", "PROTOCOLS", "SCLIP_PROTOCOL", "CLEARCLIP_PROTOCOL", "NACLIP_PROTOCOL", "MASKCLIP_PROTOCOL",
    "Protocol", "get_protocol",
    "evaluate", "EvaluationError",
]


def __getattr__(name):
    # The runner imports the model code; load it only when asked.
    if name in ("evaluate", "EvaluationError"):
        from gem_jax.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'gem_jax.eval' has no attribute {name!r}")
