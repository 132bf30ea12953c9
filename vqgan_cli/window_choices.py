"""The sliding window's choices and defaults, in one place and without importing torch (the
command line reads them to build its help). :mod:`vqgan_cli.window` implements them."""

WINDOW_MODES = ("exact", "fast")
DEFAULT_WINDOW = "fast"  # the default of sample, upscale and the library: on held-out 1280x832 maps it
# follows the map at least as well as exact (label agreement 0.820 vs 0.805, no bands) at ~10x the speed
DEFAULT_MEMORY_MIB = 512.0  # window batches (and fast's caches) are cut to fit in this
