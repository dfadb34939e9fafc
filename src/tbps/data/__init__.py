"""Datasets: annotation adapters for the public layouts, records, caption text, and the
procedural synthetic pedestrian dataset (``tbps.synth``)."""
