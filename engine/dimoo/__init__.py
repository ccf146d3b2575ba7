"""Lumina-DiMOO (a LLaDA-based masked-diffusion unified model): token ids, the network, an offline fixture."""
