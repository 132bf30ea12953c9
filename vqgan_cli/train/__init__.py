"""Training both stages from a recipe: one engine (resume, DDP, signals, cadence, final save) and a
stage each for the tokenizer and the prior, with their losses and data."""
