"""Friendly model names -> architecture, activation and where the weights are published."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Literal

from gem_jax.config import Activation

Layout = Literal["openclip", "transformers"]

#: Tokenizer files fetched with a model when its repository has them (all optional).
HUB_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json")
_WEIGHTS = {
    "transformers": ("config.json", "model.safetensors", "pytorch_model.bin"),
    "openclip": ("open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
}


class UnknownModelError(ValueError):
    """A model name that is not in the registry (the message suggests the closest one)."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One pretrained CLIP.

    Attributes:
      name: the registry name, ``"<model>:<pretrained>"`` as GEM spells them ("ViT-B/16:openai").
      architecture: key of :data:`gem_jax.config.ARCHITECTURES`.
      pretrained: open_clip's pretrained tag.
      hub_repo: Hugging Face repository holding the weights, or None when none is known.
      layout: the repository's layout, ``"openclip"`` or ``"transformers"``.
      activation: the activation the weights were trained with.
      filename: the weights file in ``hub_repo`` (or, with no repository, the file at ``url``).
      fallback_filename: a PyTorch weights file used when ``filename`` is absent (needs torch).
      config_filename: the config file in ``hub_repo``.
      url: where the original release file is published.
      packaged: for a model that ships inside gem-jax (``toy``), its folder under
        ``gem_jax/data``; it loads from there, with no download.
    """

    name: str
    architecture: str
    pretrained: str
    hub_repo: str | None
    layout: Layout
    activation: Activation
    filename: str
    fallback_filename: str | None = None
    config_filename: str | None = None
    url: str | None = None
    packaged: str | None = None

    @property
    def local_name(self) -> str:
        """Directory name of the converted copy: "ViT-B/16:openai" -> "ViT-B-16.openai"."""
        model, _, tag = self.name.partition(":")
        return f"{model.replace('/', '-')}.{tag}" if tag else model.replace("/", "-")

    def package_dir(self):
        """The folder of a packaged model (``None`` for the others)."""
        if self.packaged is None:
            return None
        import importlib.resources
        import pathlib

        return pathlib.Path(str(importlib.resources.files("gem_jax").joinpath("data", self.packaged)))


def _hub(name, arch, tag, repo, layout, activation, url=None):
    config, weights, fallback = _WEIGHTS[layout]
    return ModelEntry(name, arch, tag, repo, layout, activation, weights, fallback, config, url)


def _release(name, arch, tag, url, activation):
    # no Hugging Face copy known: only the original release file
    return ModelEntry(name, arch, tag, None, "openclip", activation, url.rsplit("/", 1)[1], url=url)


_OAI = "https://openaipublic.azureedge.net/clip/models"
_OC = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights"
_META = "https://dl.fbaipublicfiles.com/MMPT/metaclip"

# The zoo of GEM's reference (gem/gem.py _MODELS). Repository ids: open_clip 2.23's
# ``hf_hub`` where it has one, else the transformers conversion of the same weights.
# OpenAI and MetaCLIP weights were trained with QuickGELU, LAION ones with exact GELU,
# except LAION-400M ViT-B/32 (its release files are named "vit_b_32-quickgelu-...").
_ENTRIES = [
    _hub("ViT-B/32:openai", "ViT-B-32-quickgelu", "openai", "openai/clip-vit-base-patch32", "transformers",
         "quick_gelu", f"{_OAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"),
    _release("ViT-B/32:laion400m_e31", "ViT-B-32-quickgelu", "laion400m_e31",
             f"{_OC}/vit_b_32-quickgelu-laion400m_e31-d867053b.pt", "quick_gelu"),
    _release("ViT-B/32:laion400m_e32", "ViT-B-32-quickgelu", "laion400m_e32",
             f"{_OC}/vit_b_32-quickgelu-laion400m_e32-46683a32.pt", "quick_gelu"),
    _release("ViT-B/32:laion2b_e16", "ViT-B-32", "laion2b_e16", f"{_OC}/vit_b_32-laion2b_e16-af8dbd0c.pth", "gelu"),
    _hub("ViT-B/32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
         "openclip", "gelu"),
    _hub("ViT-B/32-quickgelu:metaclip_400m", "ViT-B-32-quickgelu", "metaclip_400m", "facebook/metaclip-b32-400m",
         "transformers", "quick_gelu", f"{_META}/b32_400m.pt"),
    _hub("ViT-B/32-quickgelu:metaclip_fullcc", "ViT-B-32-quickgelu", "metaclip_fullcc",
         "facebook/metaclip-b32-fullcc2.5b", "transformers", "quick_gelu", f"{_META}/b32_fullcc2.5b.pt"),
    _hub("ViT-B/16:openai", "ViT-B-16-quickgelu", "openai", "openai/clip-vit-base-patch16", "transformers",
         "quick_gelu", f"{_OAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt"),
    _release("ViT-B/16:laion400m_e31", "ViT-B-16", "laion400m_e31", f"{_OC}/vit_b_16-laion400m_e31-00efa78f.pt",
             "gelu"),
    _release("ViT-B/16:laion400m_e32", "ViT-B-16", "laion400m_e32", f"{_OC}/vit_b_16-laion400m_e32-55e67d44.pt",
             "gelu"),
    _hub("ViT-B/16:laion2b_s34b_b88k", "ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
         "openclip", "gelu"),
    _hub("ViT-B/16-quickgelu:metaclip_400m", "ViT-B-16-quickgelu", "metaclip_400m", "facebook/metaclip-b16-400m",
         "transformers", "quick_gelu", f"{_META}/b16_400m.pt"),
    _hub("ViT-B/16-quickgelu:metaclip_fullcc", "ViT-B-16-quickgelu", "metaclip_fullcc",
         "facebook/metaclip-b16-fullcc2.5b", "transformers", "quick_gelu", f"{_META}/b16_fullcc2.5b.pt"),
    _release("ViT-B/16-plus-240:laion400m_e31", "ViT-B-16-plus-240", "laion400m_e31",
             f"{_OC}/vit_b_16_plus_240-laion400m_e31-8fb26589.pt", "gelu"),
    _release("ViT-B/16-plus-240:laion400m_e32", "ViT-B-16-plus-240", "laion400m_e32",
             f"{_OC}/vit_b_16_plus_240-laion400m_e32-699c4b84.pt", "gelu"),
    _hub("ViT-L/14:openai", "ViT-L-14-quickgelu", "openai", "openai/clip-vit-large-patch14", "transformers",
         "quick_gelu", f"{_OAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"),
    _release("ViT-L/14:laion400m_e31", "ViT-L-14", "laion400m_e31", f"{_OC}/vit_l_14-laion400m_e31-69988bb6.pt",
             "gelu"),
    _release("ViT-L/14:laion400m_e32", "ViT-L-14", "laion400m_e32", f"{_OC}/vit_l_14-laion400m_e32-3d133497.pt",
             "gelu"),
    _hub("ViT-L/14:laion2b_s32b_b82k", "ViT-L-14", "laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
         "openclip", "gelu"),
    _hub("ViT-L/14-quickgelu:metaclip_400m", "ViT-L-14-quickgelu", "metaclip_400m", "facebook/metaclip-l14-400m",
         "transformers", "quick_gelu", f"{_META}/l14_400m.pt"),
    _hub("ViT-L/14-quickgelu:metaclip_fullcc", "ViT-L-14-quickgelu", "metaclip_fullcc",
         "facebook/metaclip-l14-fullcc2.5b", "transformers", "quick_gelu", f"{_META}/l14_fullcc2.5b.pt"),
    _hub("ViT-L/14-336:openai", "ViT-L-14-336-quickgelu", "openai", "openai/clip-vit-large-patch14-336",
         "transformers", "quick_gelu",
         f"{_OAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt"),
]

# Ships inside the package: a tiny CLIP gem-jax trained on synthetic scenes (docs/TOY_MODEL.md).
_ENTRIES.append(ModelEntry("toy", "toy", "gem-jax", None, "openclip", "gelu", "model.safetensors",
                           packaged="toy"))

#: The registry, by name.
MODELS: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}

#: What :func:`gem_jax.load` loads when given no name.
DEFAULT_MODEL = "ViT-B/16:openai"


def available_models() -> list[str]:
    """The registry names, e.g. ``"ViT-B/16:openai"``."""
    return list(MODELS)


def _fold(name: str) -> str:
    return name.strip().lower().replace("/", "-")


def canonical_name(name: str) -> str | None:
    if name in MODELS:
        return name
    folded = {_fold(n): n for n in MODELS}  # "ViT-B-16:openai" and "vit-b/16:OpenAI" are one entry
    hit = folded.get(_fold(name))
    if hit is None and ":" not in name:  # a bare model name means its OpenAI weights, as in GEM
        hit = folded.get(_fold(name) + ":openai")
    return hit


def get_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of a registry name.

    Case, ``/`` versus ``-`` and a missing ``:openai`` tag are forgiven
    ("vit-b-16" -> "ViT-B/16:openai"). Unknown names raise :class:`UnknownModelError`
    (a ``ValueError``) suggesting the closest name.
    """
    hit = canonical_name(name)
    if hit is not None:
        return MODELS[hit]
    raise UnknownModelError(f"unknown model {name!r}{suggestion(name)} "
                            "(`gem-jax models` lists them; a local path or a Hugging Face repo id also works)")


def packaged_dir(name: str | None):
    """The folder of ``name`` if it is a registry model that ships inside gem-jax (``toy``),
    else ``None``."""
    canonical = canonical_name(name) if name else None
    return get_entry(canonical).package_dir() if canonical is not None else None


def suggestion(name: str) -> str:
    """``"; did you mean 'X'?"`` for the closest registry name, or ``""``."""
    close = difflib.get_close_matches(name, MODELS, n=1, cutoff=0.5)
    if not close:
        lowered = {n.lower(): n for n in MODELS}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.5)]
    return f"; did you mean {close[0]!r}?" if close else ""
