"""Models: the networks the codec runs (:mod:`~promptus.models.networks`), where real weights come
from (:mod:`~promptus.models.loading`) and random-weight models built in code for tests and
timing (:mod:`~promptus.models.random_weights`). The public names are re-exported here."""

from __future__ import annotations

from .loading import (
    LDM_UNET_PREFIX, LDM_VAE_PREFIXES, SD_TURBO_FILE, SD_TURBO_FOLDER, SD_TURBO_REPO, TAESD_FOLDER, TAESD_REPO,
    find_default_weights, load_models,
)
from .networks import (
    SD_MAX_TOKENS, ModelGeometry, Models, model_digest, sd_turbo_unet_config, sd_vae_config, taesd_config,
)
from .random_weights import full_size_random_models, tiny_configs, tiny_models

__all__ = [
    "LDM_UNET_PREFIX", "LDM_VAE_PREFIXES", "SD_MAX_TOKENS", "SD_TURBO_FILE", "SD_TURBO_FOLDER", "SD_TURBO_REPO",
    "TAESD_FOLDER", "TAESD_REPO", "ModelGeometry", "Models", "find_default_weights", "full_size_random_models",
    "load_models", "model_digest", "sd_turbo_unet_config", "sd_vae_config", "taesd_config", "tiny_configs",
    "tiny_models",
]
