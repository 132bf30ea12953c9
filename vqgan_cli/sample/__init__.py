"""Drawing tokens from a prior and turning them into images: inputs and checks, top-k/p and guidance,
the exact and fast sliding windows, decoding, and the files ``sample`` and ``upscale`` write."""
