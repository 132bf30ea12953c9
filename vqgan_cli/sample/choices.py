"""The sliding window's choices and defaults, in one place and without importing torch (the
command line reads them to build its help). :mod:`vqgan_cli.sample.window` implements them."""

WINDOW_MODES = ("exact", "fast")
DEFAULT_WINDOW = "exact"  # the default of sample, upscale and the library: on the README walk's models
# it followed held-out 1280x832 maps best (label agreement 0.838 vs fast's 0.775; an earlier probe prior
# had them the other way round, 0.805 vs 0.820); fast is ~6x quicker
DEFAULT_MEMORY_MIB = 512.0  # window batches (and fast's caches) are cut to fit in this
