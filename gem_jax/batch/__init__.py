"""The streaming batch job behind ``gem-jax batch``: inputs, loader, writer, manifest, reader.

``inputs`` expands and sorts the input arguments and cuts them into parts and shards;
``loader`` decodes images on host threads ahead of the device; ``job`` runs GEM over
them in fixed-shape batches into Parquet part files; ``results`` documents the format
and reads it back (:func:`load_results`).
"""

from gem_jax.batch.inputs import InputError, Item, expand_inputs, parse_shard
from gem_jax.batch.job import BatchOptions, JobError, Summary, run
from gem_jax.batch.loader import Decoded, Sizing, decode, stream
from gem_jax.batch.results import SCHEMA, Record, Results, load_results

__all__ = ["InputError", "Item", "expand_inputs", "parse_shard", "BatchOptions", "JobError", "Summary", "run",
           "Decoded", "Sizing", "decode", "stream", "SCHEMA", "Record", "Results", "load_results"]
