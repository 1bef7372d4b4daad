"""Serving a bank outside this package's own ``generate``: every task as a plain PEFT LoRA adapter, and a router
that loads only the blocks routing reads (built on ``tuner`` and ``bank``; nothing below imports it)."""
