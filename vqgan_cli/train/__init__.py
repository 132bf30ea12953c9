"""Training both stages from a recipe: one engine (resume, DDP, signals, cadence, final save) and a
stage each for the tokenizer and the prior, with their losses and data."""


class TrainingError(Exception):
    """A run that cannot go on (non-finite losses, unusable state); the message says what to do.

    Defined here, not in the engine, so that a caller can catch it without importing torch."""
