"""The sliding window's choices and defaults, in one place and without importing torch (the
command line reads them to build its help). :mod:`vqgan_cli.window` implements them."""

WINDOW_MODES = ("exact", "fast")
DEFAULT_WINDOW = "exact"  # the default scheme of sample, upscale and the library
DEFAULT_MEMORY_MIB = 512.0  # window batches (and fast's caches) are cut to fit in this
