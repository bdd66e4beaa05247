"""Model weights: the one place where the SD-Turbo UNet, TAESD and the SD VAE come from.

The codec needs three frozen networks (docs/design.md, "The method"):

* the SD-Turbo UNet, which predicts the noise ε̂ from ``z``, timestep 999 and a prompt;
* the TAESD decoder, which turns the clean latent into an image in [-1, 1];
* an encoder for the *init latent* of frame 0: the SD VAE encoder (exact) or the
  TAESD encoder (cheaper, same latent space).

:func:`load_models` finds them in a single original-format checkpoint file, a
diffusers folder, or on the Hugging Face hub (for users who are online), and turns
every failure into a :class:`~promptus.errors.ModelNotFoundError` that says which file
goes where. :func:`tiny_models` builds small random-weight models of the same
architecture family, deterministically, for tests; :func:`full_size_random_models`
builds the real architecture with random weights for timing.

diffusers is imported lazily, inside the functions that need it, so that
``import promptus`` stays fast for code that only reads bitstreams.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

from .config import ModelIdentity
from .errors import ModelNotFoundError, PromptusError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel


logger = logging.getLogger(__name__)

#: Hub repository of SD-Turbo and the name of its original-format single file.
SD_TURBO_REPO = "stabilityai/sd-turbo"
SD_TURBO_FILE = "sd_turbo.safetensors"
#: Diffusers-format folder name of SD-Turbo under the checkpoints folder.
SD_TURBO_FOLDER = "sd-turbo"
#: Hub repository of TAESD (diffusers format) and its folder under the checkpoints folder.
TAESD_REPO = "madebyollin/taesd"
TAESD_FOLDER = "taesd"

#: Key prefixes of an original Stability/LDM checkpoint.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

#: Gains applied to the tiny models' last convolutions after the deterministic init
#: (measured once for seed 0): the UNet's predicted noise gets roughly unit std on
#: N(0, 1) input (≈ 0.32 without the gain), and the TAESD decoder's image spreads around
#: mid-grey instead of sitting near black. Constants, not measured at build time, so the
#: tiny weights never depend on the floating-point details of a forward pass.
_TINY_UNET_OUT_GAIN = 3.0
_TINY_TAESD_OUT_GAIN = 8.0


# ---------------------------------------------------------------------------------
# Shipped configurations
# ---------------------------------------------------------------------------------


def _shipped_config(filename: str) -> dict[str, Any]:
    """Read a JSON config shipped in ``promptus/configs``, without private ``_`` keys."""
    text = resources.files("promptus").joinpath("configs").joinpath(filename).read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def sd_turbo_unet_config() -> dict[str, Any]:
    """The SD-Turbo UNet config (SD 2.1-base architecture, ~866M parameters), as a fresh dict."""
    return _shipped_config("sd_turbo_unet.json")


def taesd_config() -> dict[str, Any]:
    """The TAESD (``madebyollin/taesd``) AutoencoderTiny config, as a fresh dict."""
    return _shipped_config("taesd.json")


def sd_vae_config() -> dict[str, Any]:
    """The SD 2.x VAE (AutoencoderKL) config, as a fresh dict."""
    return _shipped_config("sd_vae.json")


# ---------------------------------------------------------------------------------
# The bundle of models
# ---------------------------------------------------------------------------------


@dataclass
class Models:
    """The frozen networks the codec runs, plus a name saying where they came from.

    Attributes:
        unet: the SD-Turbo UNet (ε-prediction), called as ``unet(z, t, encoder_hidden_states=c)``.
        taesd: TAESD; the codec decodes with ``taesd.decoder`` (latent → image in [-1, 1]).
        vae: the SD VAE, needed only for its encoder (init latent); may be ``None``.
        name: ``"sd-turbo"`` (the standard file, folder or hub id), ``"tiny"``,
            ``"sd-turbo-random"``, or else the file/folder name or hub id loaded. Informative
            only: the bitstream identifies weights by :func:`model_digest`.

    All components are in eval mode with ``requires_grad=False``; gradients still
    flow through them to their inputs (the prompts).
    """

    unet: "UNet2DConditionModel"
    taesd: "AutoencoderTiny"
    vae: "AutoencoderKL | None"
    name: str
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        """Device of the UNet's weights."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the UNet's weights."""
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Models":
        """Move every component (UNet, TAESD, VAE) to ``device`` and/or ``dtype``; returns ``self``."""
        for module in self._components():
            # plain nn.Module.to: diffusers' override warns about fp32-kept modules on every dtype cast
            torch.nn.Module.to(module, device=device, dtype=dtype)
        self._digest = None
        return self

    def identity(self) -> ModelIdentity:
        """This model's identity for the bitstream header: ``ModelIdentity(name, digest)``.

        The digest (see :func:`model_digest`) is computed once and cached until :meth:`to`.
        """
        if self._digest is None:
            self._digest = model_digest(self)
        return ModelIdentity(name=self.name, digest=self._digest)

    @torch.no_grad()
    def encode_init_latent(self, frame: torch.Tensor, which: str = "vae") -> torch.Tensor:
        """Encode frame(s) ``B×3×H×W`` in [-1, 1] into the init latent ``B×4×H/8×W/8``.

        ``which="vae"``: the SD VAE encoder's posterior mean times its scaling factor
        (0.18215) — the exact init latent of the method (docs/design.md). ``which="taesd"``:
        the TAESD encoder, which produces the same (already scaled) latent space more cheaply. The frame is
        moved to the encoder's device and dtype; the latent is returned there.
        """
        if not isinstance(frame, torch.Tensor) or frame.ndim != 4 or frame.shape[1] != 3:
            shape = tuple(frame.shape) if isinstance(frame, torch.Tensor) else type(frame).__name__
            raise PromptusError(f"init latent: expected a B×3×H×W frame tensor in [-1, 1], got {shape}")
        if frame.shape[2] % 8 or frame.shape[3] % 8:
            raise PromptusError(
                f"init latent: frame size {frame.shape[3]}×{frame.shape[2]} must be a multiple of 8 "
                "(the latent is 8× smaller); crop or resize the frame first"
            )
        if which == "vae":
            if self.vae is None:
                raise PromptusError(
                    "init latent: the SD VAE encoder was not loaded (models.vae is None); "
                    "load the models with vae=True from weights that include the VAE, "
                    "or use which='taesd' for the cheaper TAESD encoder"
                )
            p = next(self.vae.parameters())
            posterior = self.vae.encode(frame.to(device=p.device, dtype=p.dtype)).latent_dist
            return posterior.mean * self.vae.config.scaling_factor
        if which == "taesd":
            p = next(self.taesd.encoder.parameters())
            # diffusers' EncoderTiny maps [-1, 1] to TAESD's [0, 1] itself (skipped only
            # under gradient checkpointing with grad enabled; no_grad keeps us clear of it)
            # and TAESD latents are already scaled (scaling_factor 1.0).
            return self.taesd.encoder(frame.to(device=p.device, dtype=p.dtype))
        raise PromptusError(f"init latent: which={which!r} is unknown; use 'vae' or 'taesd'")

    def geometry(self) -> ModelGeometry:
        """The prompt and latent shapes these networks accept (read from their configs)."""
        unet, taesd = self.unet.config, self.taesd.config
        factor = int(taesd.get("upsampling_scaling_factor", 2)) ** (len(taesd["num_decoder_blocks"]) - 1)
        if unet.in_channels != taesd.latent_channels:
            raise PromptusError(f"the UNet takes {unet.in_channels}-channel latents but TAESD makes "
                                f"{taesd.latent_channels}; these weights do not belong together")
        return ModelGeometry(embed_dim=int(unet.cross_attention_dim), latent_channels=int(unet.in_channels),
                             latent_factor=factor)

    def _components(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.taesd, self.vae) if m is not None]


#: Prompts of the SD family are at most 77 tokens long (CLIP's context).
SD_MAX_TOKENS = 77


@dataclass(frozen=True)
class ModelGeometry:
    """The shapes a model accepts: what a bitstream header must agree with before decoding.

    Attributes:
        embed_dim: width of one prompt token (the UNet's cross-attention width).
        latent_channels: channels of the latent (UNet input and TAESD decoder input).
        latent_factor: frame side / latent side (TAESD's upsampling).
        max_tokens: most prompt tokens the model was trained with.
    """

    embed_dim: int
    latent_channels: int
    latent_factor: int
    max_tokens: int = SD_MAX_TOKENS

    def check(self, config) -> None:
        """Raise PromptusError unless ``config`` (a CodecConfig) fits this model."""
        problems = []
        if config.embed_dim != self.embed_dim:
            problems.append(f"prompts of width {config.embed_dim} (the model takes {self.embed_dim})")
        if config.tokens > self.max_tokens:
            problems.append(f"{config.tokens} prompt tokens (the model takes at most {self.max_tokens})")
        if config.latent_channels != self.latent_channels:
            problems.append(f"{config.latent_channels} latent channels (the model has {self.latent_channels})")
        if config.latent_factor != self.latent_factor:
            problems.append(f"a latent {config.latent_factor}× smaller than the frame (the model's is "
                            f"{self.latent_factor}× smaller)")
        if problems:
            raise PromptusError("the clip does not fit this model: it asks for " + "; ".join(problems)
                                + ". Decode it with the model it was encoded for (--model).")


def _freeze(*modules: torch.nn.Module | None) -> None:
    for m in modules:
        if m is not None:
            m.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------
# Digest
# ---------------------------------------------------------------------------------


def model_digest(models: Models) -> bytes:
    """16-byte fingerprint of the weights that decoding depends on (UNet and TAESD decoder).

    SHA-256 over, per component (``unet``, ``taesd.decoder``) and per state-dict entry in
    sorted-name order: the name, the shape, and the raw bytes of the tensor in a
    canonical precision (floating point → float16, contiguous, CPU, little-endian),
    truncated to 16 bytes. Float16 is the canonical form so that the same weights held
    in float32 (encoder) or float16 (GPU decoder) give the same digest: fp32→fp16
    rounding is the same on every device, and a float16 copy rounds to itself. (bfloat16
    copies differ.) Tensors are streamed one at a time; ~2 s for SD-Turbo on a CPU.
    """
    h = hashlib.sha256(b"promptus-model-digest-v1\n")
    for component, module in (("unet", models.unet), ("taesd.decoder", models.taesd.decoder)):
        _hash_module(h, component, module)
    return h.digest()[:16]


def _hash_module(h: "hashlib._Hash", component: str, module: torch.nn.Module) -> None:
    state = module.state_dict()
    h.update(f"component {component} {len(state)}\n".encode())
    for name in sorted(state):
        t = state[name].detach()
        if t.is_meta:
            raise PromptusError(f"cannot fingerprint {component}.{name}: its weights are not loaded (meta tensor)")
        if t.is_floating_point():
            t = t.to(torch.float16)
        t = t.contiguous().cpu().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(state[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy() if t.dtype != torch.bool else t.numpy().astype(np.uint8))


# ---------------------------------------------------------------------------------
# Tiny and random models
# ---------------------------------------------------------------------------------


def _tiny_unet_config() -> dict[str, Any]:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        # diffusers' SD 2.x quirk: attention_head_dim holds the number of heads per block
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=1024,
        use_linear_projection=True,
    )


def _tiny_taesd_config() -> dict[str, Any]:
    return dict(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        latent_magnitude=3,
        latent_shift=0.5,
        scaling_factor=1.0,
    )


def _tiny_vae_config() -> dict[str, Any]:
    return dict(
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_configs() -> dict[str, dict[str, Any]]:
    """Architectures of :func:`tiny_models`, keyed ``"unet"``, ``"taesd"``, ``"vae"`` (fresh dicts).

    Useful with ``load_models(..., configs=tiny_configs())`` to load tiny weights saved
    as a single file.
    """
    return {"unet": _tiny_unet_config(), "taesd": _tiny_taesd_config(), "vae": _tiny_vae_config()}


@torch.no_grad()
def _deterministic_init(module: torch.nn.Module, seed: int, stream: int) -> None:
    """Overwrite every parameter from numpy's MT19937, independently of torch's RNG.

    Parameters are visited in sorted-name order: biases → 0, 1-D weights (norms) → 1,
    other weights → uniform(−b, b) with b = 1/sqrt(fan_in).
    """
    rng = np.random.RandomState([seed, stream])
    params = dict(module.named_parameters())
    for name in sorted(params):
        p = params[name]
        if name.endswith("bias"):
            values = np.zeros(p.shape, dtype=np.float32)
        elif p.ndim == 1:
            values = np.ones(p.shape, dtype=np.float32)
        else:
            bound = 1.0 / math.sqrt(math.prod(p.shape[1:]))
            values = rng.uniform(-bound, bound, size=p.shape).astype(np.float32)
        p.copy_(torch.from_numpy(values))


def tiny_models(seed: int = 0) -> Models:
    """Small random-weight models of SD-Turbo's architecture family, for tests (CPU, float32).

    Same interfaces as the real ones: the UNet takes 4-channel latents, timestep and a
    77×1024 prompt (CrossAttn/plain down and up blocks, linear projections); TAESD and
    the VAE map images to 4-channel latents 8× smaller and back. Weights depend only on
    ``seed`` (numpy's generator), not on torch's RNG, machine or version.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    configs = tiny_configs()
    unet = UNet2DConditionModel.from_config(configs["unet"])
    taesd = AutoencoderTiny.from_config(configs["taesd"])
    vae = AutoencoderKL.from_config(configs["vae"])
    for stream, module in enumerate((unet, taesd, vae)):
        _deterministic_init(module, seed, stream)
    with torch.no_grad():
        unet.conv_out.weight.mul_(_TINY_UNET_OUT_GAIN)
        last = taesd.decoder.layers[-1]  # TAESD's image is in [0, 1] before diffusers maps it to [-1, 1]
        last.weight.mul_(_TINY_TAESD_OUT_GAIN)
        last.bias.fill_(0.5)
    _freeze(unet, taesd, vae)
    return Models(unet=unet, taesd=taesd, vae=vae, name="tiny")


def full_size_random_models(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    vae: bool = False,
) -> Models:
    """The full-size SD-Turbo UNet and TAESD (and optionally the SD VAE) with random weights.

    For timing: the cost of a forward pass does not depend on the weight values. Weights
    come from torch's default init after ``torch.manual_seed(seed)``, built directly on
    ``device`` (so they differ between CPU and CUDA). Name ``"sd-turbo-random"``.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(sd_turbo_unet_config())
        taesd = AutoencoderTiny.from_config(taesd_config())
        sd_vae = AutoencoderKL.from_config(sd_vae_config()) if vae else None
    models = Models(unet=unet, taesd=taesd, vae=sd_vae, name="sd-turbo-random").to(device, dtype)
    _freeze(*models._components())
    return models


# ---------------------------------------------------------------------------------
# Finding and loading real weights
# ---------------------------------------------------------------------------------


def _download_help(checkpoints_dir: str | os.PathLike) -> str:
    d = Path(checkpoints_dir)
    return (
        f"To get the weights (online), run:\n"
        f"  hf download {SD_TURBO_REPO} {SD_TURBO_FILE} --local-dir {d}\n"
        f"  hf download {TAESD_REPO} --local-dir {d / TAESD_FOLDER}\n"
        f"(older huggingface_hub: `huggingface-cli download` with the same arguments). "
        f"This puts the SD-Turbo checkpoint at {d / SD_TURBO_FILE} and TAESD at {d / TAESD_FOLDER}/. "
        f"For a quick test without weights, use the tiny random-weight model: "
        f"load_models('tiny') in Python, `--model tiny` on the command line."
    )


def find_default_weights(checkpoints_dir: str | os.PathLike = "checkpoints") -> str | None:
    """The SD-Turbo weights ``load_models("auto")`` would use, or ``None`` if there are none.

    Looks for ``<checkpoints_dir>/sd_turbo.safetensors`` (original single file), then
    the diffusers folder ``<checkpoints_dir>/sd-turbo``.
    """
    d = Path(checkpoints_dir)
    single = d / SD_TURBO_FILE
    if single.is_file():
        return str(single)
    folder = d / SD_TURBO_FOLDER
    if (folder / "model_index.json").is_file() or (folder / "unet" / "config.json").is_file():
        return str(folder)
    return None


def _is_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it per call instead.
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_hub_id(spec: str) -> bool:
    """``owner/name``, not a weights file name, and ``owner`` is not a local folder."""
    return (
        bool(_HUB_ID.match(spec))
        and not spec.lower().endswith(_SINGLE_FILE_SUFFIXES)
        and not spec.startswith((".", "~"))
        and not Path(spec.split("/", 1)[0]).is_dir()  # "checkpoints/sd-turbo" is a missing folder
    )


def load_models(
    spec: str | os.PathLike = "auto",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    taesd: str | os.PathLike | None = None,
    vae: bool = True,
    checkpoints_dir: str | os.PathLike = "checkpoints",
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Models:
    """Load the UNet, TAESD and (optionally) the SD VAE; every failure is a ModelNotFoundError.

    Args:
        spec: where the SD-Turbo weights are:
            ``"auto"`` — :func:`find_default_weights` in ``checkpoints_dir``;
            ``"tiny"`` — :func:`tiny_models` (random weights, for tests);
            ``"random"`` — :func:`full_size_random_models` (the real architecture with
            random weights, seed 0: for timing and for runs that must not need weights);
            a ``.safetensors``/``.ckpt``/``.pth`` file — an original Stability/LDM
            checkpoint (``model.diffusion_model.*`` UNet, ``first_stage_model.*`` VAE)
            converted with diffusers' converters, or a bare diffusers-format UNet state dict;
            a diffusers folder — a pipeline (``model_index.json`` with ``unet/``, ``vae/``)
            or a UNet folder; a hub id such as ``"stabilityai/sd-turbo"`` (needs a network
            connection or the hub cache; honours ``HF_HUB_OFFLINE``).
        device, dtype: where and in which precision the models end up.
        taesd: TAESD source — a diffusers folder, a ``.safetensors`` file with
            AutoencoderTiny keys, or a hub id (``"madebyollin/taesd"``). Default:
            ``<checkpoints_dir>/taesd``, or the hub id when ``spec`` is a hub id.
        vae: load the SD VAE (for the init latent). If the source has no VAE, a warning is
            logged and ``Models.vae`` is ``None``.
        checkpoints_dir: folder searched for default weights.
        configs: architecture overrides for single files, keyed ``"unet"``, ``"vae"``,
            ``"taesd"`` (defaults: the shipped SD-Turbo configs; see :func:`tiny_configs`).
    """
    configs = dict(configs or {})
    unknown = set(configs) - {"unet", "vae", "taesd"}
    if unknown:
        raise PromptusError(f"configs: unknown component(s) {sorted(unknown)}; use 'unet', 'vae', 'taesd'")
    if spec == "tiny":
        if taesd is not None:
            logger.warning("load_models('tiny'): taesd=%r ignored; the tiny model has its own TAESD", taesd)
        models = tiny_models()
        if not vae:
            models.vae = None
        return models.to(device, dtype)

    if spec == "random":
        if taesd is not None:
            logger.warning("load_models('random'): taesd=%r ignored; the random model has its own TAESD", taesd)
        return full_size_random_models(device, dtype, vae=vae)

    if spec == "auto":
        found = find_default_weights(checkpoints_dir)
        if found is None:
            raise ModelNotFoundError(
                f"No SD-Turbo weights found: looked for {Path(checkpoints_dir) / SD_TURBO_FILE} "
                f"and the diffusers folder {Path(checkpoints_dir) / SD_TURBO_FOLDER}/.\n"
                + _download_help(checkpoints_dir)
            )
        logger.info("load_models: using SD-Turbo weights at %s", found)
        spec = found

    path = Path(os.path.expanduser(str(spec)))
    from_hub = False
    if path.is_file():
        unet, sd_vae = _load_single_file(path, configs, want_vae=vae)
        name = "sd-turbo" if path.name == SD_TURBO_FILE else path.name
    elif path.is_dir():
        unet, sd_vae = _load_diffusers_folder(path, want_vae=vae)
        name = "sd-turbo" if path.name == SD_TURBO_FOLDER else path.name
    elif _looks_like_hub_id(str(spec)):
        unet, sd_vae = _load_from_hub(str(spec), want_vae=vae, checkpoints_dir=checkpoints_dir)
        name = "sd-turbo" if spec == SD_TURBO_REPO else str(spec)
        from_hub = True
    else:
        kind = "checkpoint file" if str(spec).lower().endswith(_SINGLE_FILE_SUFFIXES) else "file or folder"
        raise ModelNotFoundError(f"SD-Turbo weights: no such {kind} {str(spec)!r}.\n" + _download_help(checkpoints_dir))

    taesd_model = _load_taesd(taesd, configs.get("taesd"), checkpoints_dir=checkpoints_dir, hub_default=from_hub)
    if vae and sd_vae is None:
        logger.warning("load_models: %s has no SD VAE; models.vae is None (use which='taesd' for init latents)", spec)
    models = Models(unet=unet, taesd=taesd_model, vae=sd_vae if vae else None, name=name).to(device, dtype)
    _freeze(*models._components())
    logger.info("load_models: loaded %r on %s as %s", name, device, dtype)
    return models


def _read_state_dict(
    path: Path, select: Callable[[list[str]], list[str]] | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of a single weights file, without unpickling arbitrary objects.

    ``select`` picks the keys to keep from the file's keys; from a safetensors file only
    those are read (an SD checkpoint also holds a text encoder we do not need).
    """
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
                return {k: f.get_tensor(k) for k in (select(keys) if select else keys)}
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle/zip errors all mean: not a readable weights file
        raise ModelNotFoundError(
            f"{path}: cannot read weights ({type(e).__name__}: {e}). Expected a .safetensors file, "
            "or a .ckpt/.pth saved with tensors only (loaded with weights_only=True); "
            "re-download the file or convert it to safetensors."
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style LDM checkpoint
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelNotFoundError(f"{path}: not a state dict; expected an SD-2.x/SD-Turbo checkpoint")
    selected = {k: state[k] for k in (select(list(state)) if select else state)}
    if not all(isinstance(v, torch.Tensor) for v in selected.values()):
        raise ModelNotFoundError(f"{path}: holds non-tensor entries where weights were expected")
    return selected


_SD2_KIND = "an SD-2.x/SD-Turbo checkpoint (SD 1.x and SDXL files do not work)"
_TAESD_KIND = f"a TAESD ({TAESD_REPO}, diffusers AutoencoderTiny) file"


def _build_with_weights(
    cls: type, config: Mapping[str, Any], state: dict[str, torch.Tensor], what: str, source: Path, kind: str = _SD2_KIND
):
    """Instantiate ``cls`` without allocating random weights and load ``state`` strictly."""
    with torch.device("meta"):
        model = cls.from_config(dict(config))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")

        details = "; ".join(
            f"{label}: {few(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise ModelNotFoundError(
            f"{source}: the {what} weights do not fit the expected architecture — this is not {kind}. {details}"
        )
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model


def _load_single_file(path: Path, configs: Mapping[str, Mapping[str, Any]], *, want_vae: bool):
    """UNet (and VAE) from one original-format (or diffusers-format UNet) weights file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_config = dict(configs.get("unet") or sd_turbo_unet_config())
    vae_config = dict(configs.get("vae") or sd_vae_config())
    prefixes = (LDM_UNET_PREFIX,) + (LDM_VAE_PREFIXES if want_vae else ())

    def select(keys: list[str]) -> list[str]:
        # original checkpoint: only the UNet (and VAE) parts; otherwise everything
        if any(k.startswith(LDM_UNET_PREFIX) for k in keys):
            return [k for k in keys if k.startswith(prefixes)]
        return keys

    state = _read_state_dict(path, select)
    ldm_unet = {k: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    logger.info("%s: %d tensors, %d under %s", path, len(state), len(ldm_unet), LDM_UNET_PREFIX)

    if ldm_unet:
        try:
            unet_state = convert_ldm_unet_checkpoint(ldm_unet, unet_config)
        except Exception as e:  # the converter indexes keys blindly; any failure means a foreign layout
            raise ModelNotFoundError(
                f"{path}: the UNet weights (keys {LDM_UNET_PREFIX}*) could not be converted "
                f"({type(e).__name__}: {e}); this is not an SD-2.x/SD-Turbo checkpoint"
            ) from e
    elif "conv_in.weight" in state and "time_embedding.linear_1.weight" in state:
        logger.info("%s: diffusers-format UNet state dict", path)
        unet_state = state  # a bare diffusers UNet file (unet/diffusion_pytorch_model.safetensors)
    else:
        sample = ", ".join(sorted(state)[:3]) or "none"
        raise ModelNotFoundError(
            f"{path}: no SD UNet weights found (expected keys {LDM_UNET_PREFIX}* of an original "
            f"SD-2.x/SD-Turbo checkpoint, e.g. {SD_TURBO_FILE}; first keys here: {sample})"
        )
    unet = _build_with_weights(UNet2DConditionModel, unet_config, unet_state, "UNet", path)

    sd_vae = None
    if want_vae and any(k.startswith(LDM_VAE_PREFIXES) for k in state):
        prefix = next(p for p in LDM_VAE_PREFIXES if any(k.startswith(p) for k in state))
        ldm_vae = {k: v for k, v in state.items() if k.startswith(prefix)}
        try:
            vae_state = convert_ldm_vae_checkpoint(ldm_vae, vae_config)
        except Exception as e:
            raise ModelNotFoundError(
                f"{path}: the VAE weights (keys {prefix}*) could not be converted ({type(e).__name__}: {e}); "
                "this is not an SD-2.x/SD-Turbo checkpoint"
            ) from e
        sd_vae = _build_with_weights(AutoencoderKL, vae_config, vae_state, "VAE", path)
    return unet, sd_vae


def _from_pretrained(cls: type, source: str | Path, what: str, help_text: str, **kwargs):
    import importlib.util

    # without accelerate, diffusers falls back to a plain init anyway, with a warning on every load
    kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
    try:
        return cls.from_pretrained(str(source), **kwargs)
    except Exception as e:  # OSError, EnvironmentError, hub HTTP errors, JSON errors ...
        raise ModelNotFoundError(
            f"{what}: cannot load from {str(source)!r} ({type(e).__name__}: {e}).\n{help_text}"
        ) from e


def _load_diffusers_folder(folder: Path, *, want_vae: bool):
    """UNet (and VAE) from a diffusers pipeline folder or a UNet folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    help_text = (
        f"A diffusers folder is either a pipeline (model_index.json, unet/, vae/) as written by "
        f"`hf download {SD_TURBO_REPO} --local-dir {folder}`, or a UNet folder (config.json + "
        f"diffusion_pytorch_model.safetensors)."
    )
    if (folder / "unet" / "config.json").is_file():
        unet = _from_pretrained(
            UNet2DConditionModel, folder, f"UNet in {folder}/unet", help_text, subfolder="unet", local_files_only=True
        )
        sd_vae = None
        if want_vae and (folder / "vae" / "config.json").is_file():
            sd_vae = _from_pretrained(
                AutoencoderKL, folder, f"VAE in {folder}/vae", help_text, subfolder="vae", local_files_only=True
            )
        return unet, sd_vae
    config = folder / "config.json"
    if config.is_file():
        try:
            class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError) as e:
            raise ModelNotFoundError(f"{config}: unreadable config ({e}).\n{help_text}") from e
        if class_name == "UNet2DConditionModel":
            unet = _from_pretrained(UNet2DConditionModel, folder, f"UNet in {folder}", help_text, local_files_only=True)
            return unet, None
        raise ModelNotFoundError(f"{folder}: holds a {class_name}, not an SD-Turbo UNet or pipeline.\n{help_text}")
    raise ModelNotFoundError(f"{folder}: not a diffusers folder (no unet/config.json or config.json).\n{help_text}")


def _load_from_hub(repo_id: str, *, want_vae: bool, checkpoints_dir: str | os.PathLike):
    """UNet (and VAE) of a hub pipeline repository, e.g. ``stabilityai/sd-turbo``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    offline = _is_offline()
    help_text = (
        f"{repo_id!r} is not a local file or folder, so it was taken as a Hugging Face hub id"
        + (" (offline: HF_HUB_OFFLINE is set, only the local hub cache was searched)" if offline else "")
        + ". "
        + _download_help(checkpoints_dir)
    )
    kwargs = {"local_files_only": offline}
    unet = _from_pretrained(UNet2DConditionModel, repo_id, f"UNet of {repo_id}", help_text, subfolder="unet", **kwargs)
    sd_vae = None
    if want_vae:
        sd_vae = _from_pretrained(AutoencoderKL, repo_id, f"VAE of {repo_id}", help_text, subfolder="vae", **kwargs)
    return unet, sd_vae


def _load_taesd(
    source: str | os.PathLike | None,
    config: Mapping[str, Any] | None,
    *,
    checkpoints_dir: str | os.PathLike,
    hub_default: bool,
) -> "AutoencoderTiny":
    """TAESD from a folder, a single diffusers-format file, or the hub."""
    from diffusers import AutoencoderTiny

    d = Path(checkpoints_dir)
    help_text = (
        f"TAESD goes in {d / TAESD_FOLDER}/ (a diffusers folder: config.json + "
        f"diffusion_pytorch_model.safetensors); fetch it online with "
        f"`hf download {TAESD_REPO} --local-dir {d / TAESD_FOLDER}`, or pass taesd='{TAESD_REPO}' when online."
    )
    if source is None:
        default = d / TAESD_FOLDER
        if default.is_dir():
            source = str(default)
        elif hub_default:
            source = TAESD_REPO
        else:
            raise ModelNotFoundError(f"TAESD weights not found: no folder {default}.\n{help_text}")
    source = str(source)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if (path / "config.json").is_file():
            return _from_pretrained(AutoencoderTiny, path, f"TAESD in {path}", help_text, local_files_only=True)
        weights = next((path / n for n in _WEIGHTS_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise ModelNotFoundError(
                f"{path}: no TAESD config.json or diffusion_pytorch_model.safetensors.\n{help_text}"
            )
        path = weights
    if path.is_file():
        state = _read_state_dict(path)
        if not any(k.startswith("decoder.") for k in state):
            raise ModelNotFoundError(
                f"{path}: not a diffusers-format TAESD file (no decoder.* keys; the original "
                f"taesd_decoder.pth files are not supported).\n{help_text}"
            )
        return _build_with_weights(AutoencoderTiny, config or taesd_config(), state, "TAESD", path, _TAESD_KIND)
    if _looks_like_hub_id(source):
        offline = _is_offline()
        return _from_pretrained(
            AutoencoderTiny, source, f"TAESD {source}", help_text + (" (HF_HUB_OFFLINE is set)" if offline else ""),
            local_files_only=offline,
        )
    raise ModelNotFoundError(f"TAESD: no such file or folder {source!r}.\n{help_text}")
