"""fbjax: a JAX LLM inference engine built around the FairBatching scheduler."""

__version__ = "0.1.0"
