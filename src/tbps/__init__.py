"""tbps: text-based person search.

Train and evaluate TBPS methods on the public benchmarks, and search your own
gallery of person crops by text. The library never parses command lines: the
CLI (``tbps.cli``) turns flags and recipe files into plain arguments.
"""

__version__ = "0.1.0"
