"""Serving: a batched, thread-safe private decode engine and an OpenAI-compatible HTTP server."""
