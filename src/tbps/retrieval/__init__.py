"""From a trained model to a ranked gallery: the encoder, exact metrics, re-ranking, re-scoring and pictures."""
