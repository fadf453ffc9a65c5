"""invdpo_core: Inversion-DPO and Diffusion-DPO for text-to-image diffusion models. No HTTP, no queue."""

import logging

__version__ = "0.1.0"


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`" warnings. diffusers imports those image processors for IP-Adapters whenever a Stable
    Diffusion pipeline is imported; this project never runs them (its pipelines have no image encoder), so without
    torchvision the fallback is right and the notice is noise on every command. Other warnings of that logger pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# On the logger transformers creates at import (logging.getLogger returns the same object then), so it applies
# whichever module of this project or its services imports diffusers first.
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
