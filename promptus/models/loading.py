"""Loading model weights: the one place where the SD-Turbo UNet, TAESD and the SD VAE come from.

:func:`load_models` finds them in a single original-format checkpoint file, a
diffusers folder, or on the Hugging Face hub (for users who are online), and turns
every failure into a :class:`~promptus.errors.ModelNotFoundError` that says which file
goes where; ``"tiny"`` and ``"random"`` name the random-weight models of
:mod:`promptus.models.random_weights`. The bundle they return is :class:`~promptus.models.networks.Models`.

diffusers is imported lazily, inside the functions that need it, so that
``import promptus`` stays fast for code that only reads bitstreams.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import ModelNotFoundError, PromptusError
from .networks import (
    Models, _freeze, diffusers_classes, sd_turbo_unet_config, sd_vae_config, taesd_config,
)
from .random_weights import full_size_random_models, tiny_models

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


def ldm_unet_names(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """{diffusers UNet name: its name in an original (LDM) single ``.safetensors`` file}: diffusers' converter
    run on shape-only (meta) tensors, so nothing is read but the file's header. None when ``path`` is not such
    a file, or when a converted tensor is not one of the file's tensors under a new name (a converter that
    computes tensors): then the names cannot be mapped and the networks must be loaded."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.startswith(LDM_UNET_PREFIX)}
    except Exception:  # noqa: BLE001 - not a readable safetensors file: no names
        return None
    if not shapes:
        return None
    diffusers_classes()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    try:
        converted = convert_ldm_unet_checkpoint(meta, dict(config or sd_turbo_unet_config()))
    except Exception:  # noqa: BLE001 - a foreign layout: the loader reports it when it loads the file
        return None
    source = {id(t): k for k, t in meta.items()}
    names = {}
    for name, t in converted.items():
        if id(t) not in source:
            return None
        names[name] = source[id(t)]
    return names


def _load_single_file(path: Path, configs: Mapping[str, Mapping[str, Any]], *, want_vae: bool):
    """UNet (and VAE) from one original-format (or diffusers-format UNet) weights file."""
    AutoencoderKL, UNet2DConditionModel = diffusers_classes("AutoencoderKL", "UNet2DConditionModel")
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
    AutoencoderKL, UNet2DConditionModel = diffusers_classes("AutoencoderKL", "UNet2DConditionModel")

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
    AutoencoderKL, UNet2DConditionModel = diffusers_classes("AutoencoderKL", "UNet2DConditionModel")

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
    (AutoencoderTiny,) = diffusers_classes("AutoencoderTiny")

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
