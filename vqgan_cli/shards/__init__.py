"""Token shards, the hand-over between the stages: the tar format, the one manifest reader and the
streaming dataset the prior trains on. ``encode/`` writes them; ``train/`` reads them."""
