"""lrtrain: LLM pretraining in less memory, with full-parameter learning."""

__version__ = "0.1.0"
