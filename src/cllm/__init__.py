"""cllm: train and run Consistency LLMs (Kou et al., ICML 2024)."""

__version__ = "0.1.0"
