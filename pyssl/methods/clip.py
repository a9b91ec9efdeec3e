"""CLIP (Radford et al., 2021): an image and a text encoder trained to match image-caption pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.data import captions as caption_text
from pyssl.losses import ClipLoss
from pyssl.methods.base import Method, MethodError, StepOutput
from pyssl.methods.registry import register
from pyssl.methods.spec import MethodSpec
from pyssl.models import TextTransformer


@register("clip")
class CLIP(Method):
    """Contrastive language-image pre-training.

    The image tower is the backbone and a linear projection; the text tower is a small causal
    transformer (:class:`~pyssl.models.TextTransformer`) read at the end-of-text token, and a
    linear projection. Both embeddings meet in pyssl's fused, symmetric InfoNCE
    (:class:`~pyssl.losses.ClipLoss`): every image is scored against every caption of the
    batch, and the N x N logit matrix is never stored. The logit scale (inverse temperature)
    is learned, starting at ``1 / temperature`` and capped at ``max_logit_scale`` (CLIP's 100).
    Under torch.distributed the loss gathers the embeddings of all ranks.

    A batch is ``(images, texts)``: uint8 or float images and int64 token rows
    (:func:`pyssl.data.captions.tokenize`). The default data set is the embedded
    ``captioned_digits`` (:func:`pyssl.data.colour.captioned_digits`). The augmentation is
    CLIP's light one, a random resized crop of 90-100% of the image: no flips (a mirrored
    digit is another shape) and no colour changes, which would contradict captions naming
    colours.

    After training, :meth:`zero_shot_classifier` turns class prompts into a classifier with
    no labelled example (:func:`pyssl.eval.zero_shot_accuracy`), and the backbone is
    evaluated like any other method's (linear probe, kNN, fine-tuning).

    ``last_metrics`` has ``loss``, ``logit_scale`` and ``i2t_acc``, the fraction of images of
    the batch whose own caption scores highest (captions repeat, so it stays below 1).

    Args:
        backbone: image encoder, a name for :func:`pyssl.models.build_backbone` or a module.
        embed_dim: width of the shared embedding space.
        text_width, text_layers, text_heads: text transformer size.
        context_length: longest token row (captions are padded to it).
        temperature: initial temperature, 0.07 in the paper.
        learn_temperature: learn the logit scale (``False`` keeps ``1 / temperature``).
        max_logit_scale: cap of the learned scale.
        lock_image: freeze the backbone, weights and BatchNorm statistics (LiT, Zhai et al.
            2022: "locked-image tuning", with a backbone from another run, ``--init-backbone``);
            the image projection, the text tower and the scale still learn.
        vocab: the word list of :func:`pyssl.data.captions.tokenize` (default: the captioned
            digits' words; ``pyssl train --data captions:FILE`` passes the file's, see
            :func:`pyssl.data.captions.build_vocab`).
        vocab_size, eot_token: for token ids from another tokenizer (default: ``len(vocab)``).
    """

    spec = MethodSpec(
        default_data="captioned_digits",
        inputs="image-text",
        # AdamW with CLIP's decoupled weight decay; biases, norms and the logit scale get none.
        train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1, "momentum": 0.9},
        run_defaults={
            "batch_size": 128,
            "lr": {"*": 1e-3},
            "warmup_epochs": 1.0,
            "epochs": 20,
            "hidden_dim": None,
            "augment_kwargs": None,
        },
    )

    @classmethod
    def run_defaults_for(cls, train_set, batch_size: int) -> dict:
        """The text tower fits the data's tokens (and its vocabulary, where the data has one)."""
        if train_set.texts is None:
            return {}
        found = {"context_length": train_set.texts.shape[1]}
        if train_set.vocab is not None:
            found["vocab"] = list(train_set.vocab)
        return found

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        image_size: int = 32,
        in_channels: int = 3,
        embed_dim: int = 128,
        text_width: int = 128,
        text_layers: int = 2,
        text_heads: int = 4,
        context_length: int = caption_text.CONTEXT_LENGTH,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        lock_image: bool = False,
        vocab: list[str] | None = None,
        vocab_size: int | None = None,
        eot_token: int = caption_text.EOT,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=None,
        augment_kwargs=None,
    ):
        try:
            self_vocab = caption_text.check_vocab(vocab if vocab is not None else caption_text.VOCAB)
        except ValueError as e:
            raise MethodError(f"clip: {e}") from None
        if vocab_size is None:
            vocab_size = len(self_vocab)
        elif vocab is not None and vocab_size != len(self_vocab):
            raise MethodError(f"clip: vocab_size {vocab_size} but vocab has {len(self_vocab)} words")
        for name, value in (
            ("embed_dim", embed_dim),
            ("text_width", text_width),
            ("text_layers", text_layers),
            ("text_heads", text_heads),
            ("context_length", context_length),
            ("vocab_size", vocab_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"clip: {name} must be a positive int, got {value!r}")
        if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise MethodError(f"clip: temperature must be > 0, got {temperature!r}")
        if not isinstance(max_logit_scale, (int, float)) or not max_logit_scale >= 1 / temperature:
            raise MethodError(
                f"clip: max_logit_scale must be >= 1 / temperature = {1 / temperature:g}, got {max_logit_scale!r}"
            )
        if text_width % text_heads:
            raise MethodError(f"clip: text_width {text_width} is not divisible by text_heads {text_heads}")
        if not isinstance(lock_image, bool):
            raise MethodError(f"clip: lock_image must be True or False, got {lock_image!r}")
        super().__init__(backbone, image_size, in_channels, mean, std, augment, augment_kwargs)
        # The words strings are tokenised with (encode_text, zero-shot prompts); vocab_size alone
        # serves token ids from a tokenizer of your own.
        self.vocab = self_vocab
        self.lock_image = lock_image
        if lock_image:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.image_projection = nn.Linear(self.backbone.out_dim, embed_dim, bias=False)
        self.text_encoder = TextTransformer(vocab_size, eot_token, context_length, text_width, text_layers, text_heads)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn_temperature)
        self.max_log_scale = math.log(max_logit_scale)
        # several ranks: each scores its own pairs against all ranks' (the same averaged gradient)
        self.criterion = ClipLoss(local_loss=True, gather_distributed=True)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        if self.lock_image:  # a locked tower keeps its BatchNorm statistics too
            self.backbone.eval()
        return self

    def augment_defaults(self, image_size: int) -> dict:
        return {"scale": (0.9, 1.0), "p_flip": 0.0, "p_jitter": 0.0, "p_gray": 0.0, "p_blur": 0.0}

    def scale(self) -> Tensor:
        """The logit scale ``exp(logit_scale)``, capped at ``max_logit_scale``."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def embed_images(self, x: Tensor) -> Tensor:
        """Normalised backbone input -> unnormalised image embeddings."""
        return self.image_projection(self.backbone(x).flatten(1))

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Raw images (uint8 or [0, 1] float) -> image embeddings (L2-normalised unless ``normalize=False``)."""
        z = self.embed_images(self.normalize(images.to(self.logit_scale.device)))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, texts: Tensor | str | Sequence[str], normalize: bool = True) -> Tensor:
        """Token rows, or strings (tokenised here) -> text embeddings."""
        if isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], str)):
            texts = caption_text.tokenize(texts, self.text_encoder.context_length, truncate=True, vocab=self.vocab)
            texts = texts.to(self.logit_scale.device)
        z = self.text_projection(self.text_encoder(texts))
        return F.normalize(z, dim=-1) if normalize else z

    def _pairs(self, batch) -> tuple[Tensor, Tensor]:
        if not (
            isinstance(batch, (tuple, list))
            and len(batch) >= 2
            and isinstance(batch[0], Tensor)
            and isinstance(batch[1], Tensor)
        ):
            raise MethodError(
                "clip trains on image-text pairs: a batch must be (images, texts); use --data "
                "captioned_digits or another data set with captions"
            )
        images, texts = batch[0], batch[1]
        if images.dim() != 4:
            raise MethodError(f"clip: expected images (B, C, H, W), got {tuple(images.shape)}")
        if texts.shape[:1] != images.shape[:1]:
            raise MethodError(f"clip: {images.shape[0]} images but {texts.shape[0] if texts.dim() else 0} texts")
        try:
            self.text_encoder.check_tokens(texts)
        except ValueError as e:
            raise MethodError(f"clip: {e}") from None
        return images, texts

    def training_step(self, batch) -> StepOutput:
        images, texts = self._pairs(batch)
        image_z = self.embed_images(self.augment(images))
        text_z = self.text_projection(self.text_encoder(texts, check=False))  # _pairs checked them
        scale = self.scale()
        loss = self.criterion(image_z, text_z, scale)
        with torch.no_grad():
            sim = F.normalize(image_z.detach().float(), dim=-1) @ F.normalize(text_z.detach().float(), dim=-1).T
            hits = (sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean()
        return self.output(loss, logit_scale=scale, i2t_acc=hits)

    @torch.no_grad()
    def zero_shot_classifier(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        """Class embeddings ``(C, D)`` from prompts, one list of templates filled in per class:
        each class's prompts are embedded, normalised, averaged and normalised again (CLIP's
        prompt ensemble). ``images @ classifier.T`` then scores each class."""
        if not prompts or any(isinstance(p, str) or not p for p in prompts):
            raise ValueError("zero_shot_classifier: prompts must be a non-empty list of non-empty lists of strings")
        was = self.training
        self.eval()
        try:
            weights = [self.encode_text(list(p)).mean(0) for p in prompts]
        finally:
            self.train(was)
        return F.normalize(torch.stack(weights), dim=-1)

    def class_prompts(
        self, classes: Sequence[str], templates: Sequence[str] = ("a photo of a {c}", "a {c}", "{c}")
    ) -> list[list[str]]:
        """Zero-shot prompts for class names (one list of filled-in templates per class).
        Raises ``ValueError`` naming the class words the vocabulary lacks: their prompts would
        read ``<unk>``, and classes that differ only there could not be told apart."""
        vocab = set(self.vocab)
        missing = sorted({w for c in classes for w in caption_text.split_words(c)} - vocab)
        if missing or not classes:
            raise ValueError(f"class names {missing or list(classes)} are not words of the model's vocabulary")
        return caption_text.class_prompts(list(classes), templates, "c")

    @staticmethod
    def digit_prompts() -> list[list[str]]:
        """Zero-shot prompts of the ten digit classes of ``captioned_digits``."""
        return caption_text.class_prompts(caption_text.DIGIT_WORDS, caption_text.DIGIT_PROMPTS, "d")

    @staticmethod
    def colour_prompts() -> list[list[str]]:
        """Zero-shot prompts of the eight paint colours of ``captioned_digits``."""
        return caption_text.class_prompts(caption_text.COLOUR_NAMES, caption_text.COLOUR_PROMPTS, "c")
