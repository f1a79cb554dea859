"""OpenAI-style chat and completions routes."""
