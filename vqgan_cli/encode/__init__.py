"""encode-dataset: token shards on disk connect stage one (tokenizer) to stage two (prior).

``encode_dataset(EncodeOptions(...))`` writes webdataset tar shards and ``manifest.json``
(format: :mod:`vqgan_cli.shards.format`, which also holds the stage-two reader);
``verify_shards(folder)`` checks every shard against the manifest.

Modules: ``inputs`` (items, maps, labels, per-item preparation), ``loader`` (batches for the
encoder), ``models`` (tokenizers and the conditioning stage), ``store`` (manifest, crash-safe
commits, resume, verify), ``runner`` (the command itself).
"""

from vqgan_cli.encode.inputs import EncodeUsageError
from vqgan_cli.encode.loader import shard_batches
from vqgan_cli.encode.runner import EncodeOptions, EncodeResult, encode_dataset
from vqgan_cli.encode.store import VerifyReport
from vqgan_cli.encode.store import verify_folder as verify_shards

__all__ = ["EncodeOptions", "EncodeResult", "EncodeUsageError", "VerifyReport", "encode_dataset",
           "shard_batches", "verify_shards"]
