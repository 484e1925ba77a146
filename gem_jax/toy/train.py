"""Training the toy CLIP on toy scenes, as CLIP is trained: the image-caption contrastive loss only.

The model is gem-jax's own :class:`gem_jax.models.CLIP`; the loss is CLIP's symmetric
cross-entropy over a batch of (image, caption) pairs with a learned logit scale; the
optimiser is optax's AdamW with a linear warm-up and a cosine decay, gradients clipped
by global norm. Nothing sees a mask: the masks are for evaluation only.

Every batch is a pure function of the run's seed and the step (scene seeds, caption
order), so a run killed and resumed from its last saved state continues exactly as an
uninterrupted one. The state (parameters, optimiser state, step) is written atomically
every ``save_every`` steps to ``<out>.state.npz``; the finished model is written to
``<out>`` in gem-jax's native format (:func:`gem_jax.checkpoints.save_native`), with the
recipe and the recommended GEM settings in its ``config.json``, and the state file is
then removed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import queue
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gem_jax import files
from gem_jax.checkpoints import save_native
from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
from gem_jax.models import CLIP
from gem_jax.models.layers import l2_normalize
from gem_jax.preprocess import normalize
from gem_jax.progress import Progress
from gem_jax.toy import scenes, vocab

#: Training scenes use seeds from here on (``TRAIN_SEED_BASE + run_seed * 2**40 + index``),
#: so they never coincide with the held-out seeds below :data:`TRAIN_SEED_BASE`.
TRAIN_SEED_BASE = 2 ** 50
STATE_SUFFIX = ".state.npz"
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights, besides the seed.

    Attributes:
      image_size, patch_size: scene side and ViT patch side, in pixels.
      vision_width, vision_layers, vision_heads: the image tower.
      text_width, text_layers, text_heads: the text tower.
      embed_dim: the joint embedding width.
      context_length: text token positions.
      activation: ``"gelu"`` or ``"quick_gelu"``.
      batch_size: (image, caption) pairs per step.
      steps: optimiser steps.
      learning_rate: peak learning rate, reached after ``warmup_steps``, then cosine
        decay to ``learning_rate * final_lr_ratio``.
      weight_decay: AdamW decay of the weight matrices (not of gains, biases, embeddings).
      beta2: Adam's second-moment decay.
      clip_norm: global gradient-norm clip.
      logit_scale_init: initial logit scale (CLIP: 1 / 0.07); it is learned, capped at 100.
      background_rate: how often a caption names the background (else objects only).
    """

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    embed_dim: int = 128
    context_length: int = vocab.CONTEXT_LENGTH
    activation: str = "gelu"
    batch_size: int = 128
    steps: int = 400
    learning_rate: float = 2e-3
    warmup_steps: int = 40
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    beta2: float = 0.98
    clip_norm: float = 1.0
    logit_scale_init: float = 1 / 0.07
    background_rate: float = 1.0

    def config(self):
        """The :class:`gem_jax.config.CLIPConfig` of the model."""
        return CLIPConfig(
            vision=VisionConfig(image_size=self.image_size, patch_size=self.patch_size, width=self.vision_width,
                                layers=self.vision_layers, heads=self.vision_heads, activation=self.activation),
            text=TextConfig(context_length=self.context_length, vocab_size=len(vocab.build()[0]),
                            width=self.text_width, layers=self.text_layers, heads=self.text_heads,
                            activation=self.activation),
            embed_dim=self.embed_dim)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        return cls(**d)


#: The recipe of the shipped model (``gem-jax train-toy`` trains it by default).
RECIPE = Recipe()
#: The seed of the shipped model (of the three trained, the one the model card chose).
SEED = 2


# ----------------------------------------------------------------------------- data


def scene_seed(run_seed: int, index: int) -> int:
    """The seed of the ``index``-th training scene of a run."""
    return TRAIN_SEED_BASE + run_seed * 2 ** 40 + index


def training_caption(scene: scenes.Scene, rng: np.random.Generator, background_rate: float = 1.0) -> str:
    """A caption of ``scene`` for training: its objects in a random order, and its background
    with probability ``background_rate``."""
    order = rng.permutation(len(scene.objects))
    phrases = [scene.objects[i][0] for i in order]
    background = scene.background if rng.random() < background_rate else None
    return scenes.caption(phrases, background)


def make_batch(recipe: Recipe, run_seed: int, step: int, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The batch of ``step``: normalised pixels (B, S, S, 3) float32 and caption ids (B, L) int32."""
    b = recipe.batch_size
    images = np.empty((b, recipe.image_size, recipe.image_size, 3), np.uint8)
    texts = []
    for i in range(b):
        seed = scene_seed(run_seed, step * b + i)
        sc = scenes.scene(seed, recipe.image_size)
        images[i] = sc.image
        texts.append(training_caption(sc, np.random.default_rng([seed, 1]), recipe.background_rate))
    return normalize(images), tokenizer(texts)


def _prefetch(make: Callable[[int], Any], steps: range, depth: int = 2) -> Iterator[Any]:
    """``make(step)`` for each step, computed on a background thread ``depth`` steps ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for s in steps:
                if stop.is_set():
                    return
                q.put((s, make(s), None))
        except BaseException as e:  # handed to the consumer
            q.put((None, None, e))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        for _ in steps:
            s, item, err = q.get()
            if err is not None:
                raise err
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


# ----------------------------------------------------------------------------- optimisation


def _decay_mask(params):
    def keep(path, leaf):
        names = {getattr(p, "key", None) for p in path}
        return leaf.ndim >= 2 and not names & {"positional_embedding", "class_embedding", "token_embedding"}

    return jax.tree_util.tree_map_with_path(keep, params)


def optimizer(recipe: Recipe):
    """AdamW with linear warm-up and cosine decay, global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, recipe.learning_rate, recipe.warmup_steps, max(recipe.steps, recipe.warmup_steps + 1),
        end_value=recipe.learning_rate * recipe.final_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(recipe.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=recipe.beta2, eps=1e-8, weight_decay=recipe.weight_decay,
                                   mask=_decay_mask))


def init_state(recipe: Recipe, seed: int) -> dict:
    """Step 0: random parameters of the recipe's model (``seed``), the logit scale, optimiser state."""
    return {**jax.jit(lambda: _init(recipe, seed))(), "step": 0}


def _init(recipe: Recipe, seed: int) -> dict:
    cfg = recipe.config()
    s = cfg.vision.image_size
    clip = CLIP(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, s, s, 3), jnp.float32),
                          jnp.zeros((1, cfg.text.context_length), jnp.int32))["params"]
    params = {"clip": clip, "log_scale": jnp.asarray(math.log(recipe.logit_scale_init), jnp.float32)}
    return {"params": params, "opt": optimizer(recipe).init(params)}


def contrastive_loss(image_emb, text_emb, log_scale):
    """CLIP's symmetric cross-entropy; ``log_scale`` is capped at log(100)."""

    scale = jnp.exp(jnp.minimum(log_scale, math.log(100.0)))
    logits = scale * l2_normalize(image_emb) @ l2_normalize(text_emb).T
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def train_step_fn(recipe: Recipe):
    """The jitted ``(params, opt_state, pixels, ids) -> (params, opt_state, loss)``."""

    model = CLIP(recipe.config())
    tx = optimizer(recipe)

    def loss_fn(params, pixels, ids):
        img, txt = model.apply({"params": params["clip"]}, pixels, ids)
        return contrastive_loss(img, txt, params["log_scale"])

    @jax.jit
    def step(params, opt_state, pixels, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# ----------------------------------------------------------------------------- state files


def state_path(out) -> pathlib.Path:
    """Where the training state of a run writing ``out`` is kept: ``<out>.state.npz``."""
    out = pathlib.Path(out)
    return out.with_name(out.name + STATE_SUFFIX)


class StateError(ValueError):
    """A state file that cannot be resumed from (damaged, or another recipe's)."""


def _identity(recipe: Recipe, seed: int) -> str:
    return json.dumps({"version": STATE_VERSION, "seed": seed, "recipe": recipe.to_dict()}, sort_keys=True)


def save_state(path, state: dict, recipe: Recipe, seed: int, extra: dict | None = None) -> None:
    """Writes ``state`` atomically (all leaves as float arrays, in tree order)."""

    leaves = jax.tree_util.tree_leaves({"params": state["params"], "opt": state["opt"]})
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays["step"] = np.asarray(state["step"], np.int64)
    arrays["identity"] = np.asarray(_identity(recipe, seed))
    arrays["extra"] = np.asarray(json.dumps(extra or {}))

    def write(f):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())

    files.atomic_write(path, write, record=True)


def load_state(path, recipe: Recipe, seed: int) -> tuple[dict, dict]:
    """The state saved at ``path`` and its extra record; :class:`StateError` if it is not this run's."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # a damaged file: zip, header or array errors
        raise StateError(f"cannot read the training state {path}: {e}") from None
    if str(data.get("identity", "")) != _identity(recipe, seed):
        raise StateError(f"{path} holds the state of another training run (other seed or recipe)")
    template = init_state_shapes(recipe, seed)
    leaves, treedef = jax.tree_util.tree_flatten({"params": template["params"], "opt": template["opt"]})
    saved = [data.get(f"leaf_{i:05d}") for i in range(len(leaves))]
    if any(s is None or s.shape != tuple(t.shape) for s, t in zip(saved, leaves)):
        raise StateError(f"{path} does not match the recipe's model")
    tree = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(s, t.dtype) for s, t in zip(saved, leaves)])
    extra = json.loads(str(data.get("extra", "{}")))
    return {"params": tree["params"], "opt": tree["opt"], "step": int(data["step"])}, extra


def init_state_shapes(recipe: Recipe, seed: int):
    return jax.eval_shape(lambda: _init(recipe, seed))


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Result:
    """What :func:`train` did.

    Attributes:
      out: the model directory.
      resumed_from: the step it resumed from (0 for a fresh run).
      steps: the last step reached.
      seconds: wall time of this call's training (not of earlier, interrupted calls).
      total_seconds: training time over all calls of the run.
      final_loss: mean loss of the last 20 steps.
      logit_scale: the learned logit scale.
    """

    out: pathlib.Path
    resumed_from: int
    steps: int
    seconds: float
    total_seconds: float
    final_loss: float
    logit_scale: float


#: GEM's temperature the model card recommends for toy models. GEM's adaptive rule (mean
#: token norm over the square root of the head width) gives about 0.5 on these small
#: models, where self-self attention is nearly uniform over the 64 patches; 0.05 was chosen
#: on validation scenes (seeds 10000-10099) of the models trained while the recipe was set.
TEMPERATURE = 0.05


def default_gem_settings(recipe: Recipe) -> dict:
    """The GEM settings the model card recommends for a model of ``recipe``, as ``gem_jax.GEM``
    keyword arguments: the path over every block, one iteration, :data:`TEMPERATURE`, the
    training size, and the captions' own form as the template."""
    return {"method": "gem", "layers": recipe.vision_layers, "iterations": 1, "temperature": TEMPERATURE,
            "size": recipe.image_size, "template": "a {}"}


def train(out, recipe: Recipe = RECIPE, seed: int = SEED, *, save_every: int = 25, progress=True,
          force: bool = False, stop_after: int | None = None, log: Callable[[str], None] | None = None) -> Result:
    """Trains (or resumes) the toy model of ``recipe`` and ``seed`` and writes it to ``out``.

    Resumes from ``<out>.state.npz`` when it holds this run's state (``force``: starts
    over, deleting it). The state file is gem-jax's own (recorded in the directory's
    :class:`gem_jax.files.Ledger`): a file of that name gem-jax did not write raises
    :class:`gem_jax.files.OutputError` and is left alone. ``progress``: a
    :class:`gem_jax.progress.Progress`, or whether to show one. ``stop_after`` stops
    (saving the state) after that many steps of this call, for tests.
    """

    out = pathlib.Path(out)
    spath = state_path(out)

    if not isinstance(progress, Progress):
        progress = Progress("train-toy", quiet=not progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    files.remove_stale(out.parent)  # temporaries of a killed run
    if os.path.lexists(spath) and not files.Ledger(spath.parent).owned(spath):
        raise files.OutputError(f"{spath} exists and was not written by gem-jax (or was changed since); it is "
                                "left alone: move it away or choose another output")
    if force:
        files.remove_owned(spath)
    log = log or progress.say
    tok = vocab.tokenizer(recipe.context_length)
    start, extra = 0, {}
    if spath.exists():
        state, extra = load_state(spath, recipe, seed)
        start = state["step"]
        log(f"resuming from step {start} ({spath})")
    else:
        state = init_state(recipe, seed)
    step_fn = train_step_fn(recipe)
    params, opt = state["params"], state["opt"]
    end = recipe.steps if stop_after is None else min(recipe.steps, start + stop_after)
    seconds_before = float(extra.get("seconds", 0.0))
    losses = list(extra.get("recent_losses", []))
    t0 = time.perf_counter()
    step = start
    batches = _prefetch(lambda s: make_batch(recipe, seed, s, tok), range(start, end))
    bar = progress.bar(recipe.steps, unit="step", initial=start)
    try:
        for pixels, ids in batches:
            params, opt, loss = step_fn(params, opt, pixels, ids)
            step += 1
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at step {step}")
            losses = (losses + [loss])[-20:]
            elapsed = time.perf_counter() - t0
            bar.postfix(f"loss {loss:.3f}, {(step - start) * recipe.batch_size / elapsed:.0f} images/s")
            bar.update(1)
            if step % save_every == 0 and step < recipe.steps:
                save_state(spath, {"params": params, "opt": opt, "step": step}, recipe, seed,
                           {"seconds": seconds_before + elapsed, "recent_losses": losses})
    except KeyboardInterrupt:
        if step > start:  # keep what this call trained
            save_state(spath, {"params": params, "opt": opt, "step": step}, recipe, seed,
                       {"seconds": seconds_before + time.perf_counter() - t0, "recent_losses": losses})
        raise
    finally:
        bar.close()
        batches.close()
    elapsed = time.perf_counter() - t0
    total = seconds_before + elapsed
    scale = float(np.exp(min(float(params["log_scale"]), math.log(100.0))))
    final_loss = float(np.mean(losses)) if losses else float("nan")
    if step < recipe.steps:
        save_state(spath, {"params": params, "opt": opt, "step": step}, recipe, seed,
                   {"seconds": total, "recent_losses": losses})
        return Result(out, start, step, elapsed, total, final_loss, scale)
    meta = {
        "toy": {"seed": seed, "steps": recipe.steps, "recipe": recipe.to_dict(), "train_seconds": round(total, 1),
                "final_loss": round(final_loss, 4), "logit_scale": round(scale, 3),
                "card": "docs/TOY_MODEL.md"},
        "defaults": default_gem_settings(recipe),
    }
    with tempfile.TemporaryDirectory() as tmp:
        vocab.write_tokenizer(tmp, recipe.context_length)
        save_native(out, recipe.config(), jax.device_get(params["clip"]), tokenizer_dir=tmp, force=True,
                    metadata=meta)
    spath.unlink(missing_ok=True)
    return Result(out, start, step, elapsed, total, final_loss, scale)
