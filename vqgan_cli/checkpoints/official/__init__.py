"""The reference release's ``.ckpt`` files: a pickle reader that runs no code from the file, and the
importers that map official tokenizer and transformer keys onto our models, exactly."""
