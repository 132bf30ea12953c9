"""encode-dataset: token shards on disk connect stage one (tokenizer) to stage two (prior).

``encode_dataset(EncodeOptions(...))`` writes webdataset tar shards and ``manifest.json``
(format: :mod:`vqgan_cli.data.shards`, which also holds the stage-two reader);
``verify_shards(folder)`` checks every shard against the manifest.
"""

from vqgan_cli.encode.inputs import EncodeUsageError
from vqgan_cli.encode.runner import EncodeOptions, EncodeResult, encode_dataset, shard_batches
from vqgan_cli.encode.store import VerifyReport, verify_folder as verify_shards

__all__ = ["EncodeOptions", "EncodeResult", "EncodeUsageError", "VerifyReport", "encode_dataset",
           "shard_batches", "verify_shards"]
