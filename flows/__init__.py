"""Prefect flows of gptcore: thin orchestration over the stage functions in `gptcore`."""
