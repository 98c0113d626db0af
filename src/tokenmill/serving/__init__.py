"""The OpenAI-compatible HTTP API: thin routes over the engine client and the platform services."""
