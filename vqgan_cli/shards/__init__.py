"""Token shards, the hand-over between the stages: the tar format, the one manifest reader and the
stage-two dataset (format.py), the check against the manifest (verify.py). encode/ writes them."""
