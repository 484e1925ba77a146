"""Benchmarks: the model side by side with the reference (:mod:`~gem_jax.bench.model`), the
batch job's input pipeline (:mod:`~gem_jax.bench.pipeline`), and prompt counts with the text
side (:mod:`~gem_jax.bench.vocabulary`)."""

from gem_jax.bench.model import format_table, matmul_peak, run
from gem_jax.bench.pipeline import format_pipeline, pipeline
from gem_jax.bench.vocabulary import format_vocabulary, vocabulary
from gem_jax.engine.cost import count_flops

__all__ = ["count_flops", "format_pipeline", "format_table", "format_vocabulary", "matmul_peak", "pipeline", "run",
           "vocabulary"]
