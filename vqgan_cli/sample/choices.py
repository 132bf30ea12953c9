"""The sliding window's choices and defaults, in one place and without importing torch (the
command line reads them to build its help). :mod:`vqgan_cli.sample.window` implements them."""

WINDOW_MODES = ("exact", "fast")
DEFAULT_WINDOW = "exact"  # the default of sample, upscale and the library: the reference's own window,
# no seams (README walk, 8 held-out 1280x832 maps: agreement 0.890, seam 0.96; fast 0.903 but seams at its
# tile boundaries, 1.11; earlier priors had the two either way round); fast is ~8x quicker
DEFAULT_MEMORY_MIB = 512.0  # window batches (and fast's caches) are cut to fit in this
