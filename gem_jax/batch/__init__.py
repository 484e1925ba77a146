"""The streaming batch job behind ``gem-jax batch``: inputs, loader, job, store.

``inputs`` expands and sorts the input arguments and cuts them into parts and shards;
``loader`` decodes images on host threads ahead of the device; ``job`` runs a method over
them in fixed-shape batches into Parquet parts; ``store`` is the output directory (manifest,
parts, errors, lock) and reads it back (:func:`load_results`).
"""

from gem_jax.batch.inputs import InputError, Item, expand_inputs, parse_shard
from gem_jax.batch.job import BatchOptions, Interrupted, Summary, check_output, run
from gem_jax.batch.loader import Decoded, Sizing, decode, stream
from gem_jax.batch.store import SCHEMA, JobError, Record, Results, load_results

__all__ = ["InputError", "Item", "expand_inputs", "parse_shard", "BatchOptions", "Interrupted", "JobError",
           "Summary", "check_output", "run", "Decoded", "Sizing", "decode", "stream", "SCHEMA", "Record", "Results",
           "load_results"]
