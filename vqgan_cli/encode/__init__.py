"""encode-dataset: token shards on disk connect stage one (tokenizer) to stage two (prior).

``encode_dataset(EncodeOptions(...))`` writes webdataset tar shards and ``manifest.json``
(format: :mod:`vqgan_cli.shards.format`, which also holds the stage-two reader; checking a
folder: :mod:`vqgan_cli.shards.verify`).

Modules: ``inputs`` (items, maps, labels, per-item preparation), ``loader`` (batches for the
encoder), ``models`` (tokenizers and the conditioning stage), ``store`` (manifest, crash-safe
commits, resume), ``ranks`` (the shards split over torchrun processes), ``runner`` (the command
itself).
"""

from vqgan_cli.encode.inputs import EncodeUsageError
from vqgan_cli.encode.loader import shard_batches
from vqgan_cli.encode.runner import EncodeOptions, EncodeResult, encode_dataset

__all__ = ["EncodeOptions", "EncodeResult", "EncodeUsageError", "encode_dataset", "shard_batches"]
