"""ctxstretch: extend the context window of a causal language model cheaply, and prove it worked."""

__version__ = "0.1.0"
