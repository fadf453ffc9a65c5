"""invdpo_core: Inversion-DPO and Diffusion-DPO for text-to-image diffusion models. No HTTP, no queue."""

__version__ = "0.1.0"
