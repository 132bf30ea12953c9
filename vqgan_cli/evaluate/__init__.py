"""``vqgan evaluate``: tokenizer reconstruction metrics (with rFID), FID/KID/IS of sample folders
(with label agreement for samples of built-in maps), and prior likelihoods on token shards.

Every metric's formula lives in :mod:`vqgan_cli.metrics`; this package runs models over data sets
and collects the numbers into typed results."""

from vqgan_cli.evaluate.inception import (
                                          INCEPTION_FILE,
                                          EvaluationError,
                                          Inception,
                                          InceptionWeightsMissing,
                                          check_inception_weights,
                                          default_weights_path,
)
from vqgan_cli.evaluate.prior import PriorResult, evaluate_prior
from vqgan_cli.evaluate.samples import SamplesResult, evaluate_samples, load_stats, save_stats
from vqgan_cli.evaluate.tokenizer import TokenizerResult, evaluate_tokenizer
from vqgan_cli.metrics import batch_metrics
from vqgan_cli.train.validation import validate  # re-exported where it used to live

__all__ = ["INCEPTION_FILE", "EvaluationError", "Inception", "InceptionWeightsMissing", "PriorResult",
           "SamplesResult", "TokenizerResult", "batch_metrics", "check_inception_weights",
           "default_weights_path", "evaluate_prior", "evaluate_samples", "evaluate_tokenizer",
           "load_stats", "save_stats", "validate"]
