"""Captions for the embedded image-text data, and the word-level tokenizer of pyssl's CLIP.

The captioned digits (:func:`pyssl.data.colour.captioned_digits`) have three independent
attributes that a caption may name: the digit (written as a word or a numeral), the colour
it is painted in, and the photograph behind it. Captions are drawn from a few templates and
mention the colour and the background only some of the time, so, as with alt-text, no
single word identifies an image: the text encoder has to learn which words name which
property of the picture.

The tokenizer is a fixed word-level vocabulary (the caption words plus four special
tokens); ``tokenize`` lower-cases, splits on anything that is not a letter or a digit,
and maps words outside the vocabulary to ``<unk>``. A token row is
``<sot> w1 ... wn <eot> <pad> ...``: CLIP's layout, with the text feature read at ``<eot>``.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Sequence

import torch
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: The paint colours of the captioned digits and their hues (HSV, 0..1).
COLOUR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta")
COLOUR_HUES = (0.0, 0.08, 0.16, 0.33, 0.5, 0.63, 0.76, 0.87)
#: scikit-learn's two sample photographs, in the order ``load_sample_images`` returns them.
BACKGROUND_NAMES = ("temple", "flower")

# {d}: digit, {c}: colour, {b}: background. A template is picked by which attributes the
# caption names, so every caption states what it names and nothing else.
_TEMPLATES = {
    (): ("a {d}", "the digit {d}", "a photo of the number {d}", "a handwritten {d}"),
    ("c",): ("a {c} {d}", "the digit {d} in {c}", "a {d} painted {c}", "a photo of a {c} number {d}"),
    ("b",): ("a {d} on a {b}", "the digit {d} over a picture of a {b}", "a photo of the number {d} on a {b}"),
    ("c", "b"): (
        "a {c} {d} on a {b}",
        "the digit {d} in {c} over a picture of a {b}",
        "a photo of a {c} number {d} on a {b}",
    ),
}
#: The prompt templates of zero-shot digit classification (an ensemble, as in CLIP).
DIGIT_PROMPTS = ("a {d}", "the digit {d}", "a photo of the number {d}")
COLOUR_PROMPTS = ("a {c} digit", "a photo of a {c} number", "a number painted {c}")

SPECIALS = ("<pad>", "<sot>", "<eot>", "<unk>")
PAD, SOT, EOT, UNK = range(4)
CONTEXT_LENGTH = 16


def _template_words() -> set[str]:
    words = set()
    for group in _TEMPLATES.values():
        for t in group:
            words.update(split_words(t.replace("{d}", "").replace("{c}", "").replace("{b}", "")))
    for t in DIGIT_PROMPTS + COLOUR_PROMPTS:
        words.update(split_words(t.replace("{d}", "").replace("{c}", "")))
    return words


def _fill(template: str, **names: str) -> str:
    # "a orange" -> "an orange", "a eight" -> "an eight"
    return re.sub(r"\ba (?=[aeiou])", "an ", template.format(**names))


def split_words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: the words the tokenizer sees."""
    return re.findall(r"[a-z0-9]+", text.lower())


VOCAB: tuple[str, ...] = SPECIALS + tuple(
    sorted(
        _template_words()
        | set(DIGIT_WORDS)
        | set(COLOUR_NAMES)
        | set(BACKGROUND_NAMES)
        | {str(i) for i in range(10)}
        | {"an"}
    )
)


@functools.lru_cache(maxsize=8)
def _index(vocab: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate(vocab)}


def check_vocab(vocab) -> tuple[str, ...]:
    """A vocabulary as a tuple; it must start with :data:`SPECIALS` and hold each word once."""
    vocab = tuple(vocab)
    if vocab[: len(SPECIALS)] != SPECIALS or not all(isinstance(w, str) for w in vocab):
        raise ValueError(f"vocab must be a list of words starting with {list(SPECIALS)}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("vocab holds a word twice")
    return vocab


def build_vocab(texts: Sequence[str], max_words: int = 20000) -> tuple[str, ...]:
    """A word vocabulary for your own captions: :data:`SPECIALS`, then the ``max_words`` most
    frequent words of ``texts`` (ties in alphabetical order). Rarer words become ``<unk>``."""
    if not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"build_vocab: max_words must be a positive int, got {max_words!r}")
    counts = collections.Counter(w for t in texts for w in split_words(t))
    words = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
    return SPECIALS + tuple(words)


def tokenize(
    texts: str | Sequence[str],
    context_length: int = CONTEXT_LENGTH,
    truncate: bool = False,
    vocab: Sequence[str] | None = None,
) -> Tensor:
    """Texts -> int64 ``(len(texts), context_length)`` token rows (``<sot> ... <eot> <pad>...``).

    ``vocab``: the word list (default :data:`VOCAB`, the captioned digits' words; see
    :func:`build_vocab`). Unknown words become ``<unk>``. A text longer than
    ``context_length - 2`` words raises ``ValueError`` naming it, unless ``truncate=True``
    (then it is cut and still ends in ``<eot>``).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(context_length, int) or context_length < 3:
        raise ValueError(f"tokenize: context_length must be an int >= 3, got {context_length!r}")
    index = _index(VOCAB if vocab is None else tuple(vocab))
    rows = torch.full((len(texts), context_length), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize: texts must be strings, got {type(text).__name__} at index {i}")
        ids = [index.get(w, UNK) for w in split_words(text)]
        if len(ids) > context_length - 2:
            if not truncate:
                raise ValueError(
                    f"tokenize: text {i} has {len(ids)} words, more than context_length - 2 = "
                    f"{context_length - 2}: {text!r} (pass truncate=True to cut it)"
                )
            ids = ids[: context_length - 2]
        ids = [SOT, *ids, EOT]
        rows[i, : len(ids)] = torch.tensor(ids)
    return rows


def decode(tokens: Tensor, vocab: Sequence[str] | None = None) -> list[str]:
    """Token rows -> texts (the words between ``<sot>`` and ``<eot>``)."""
    vocab = VOCAB if vocab is None else vocab
    if tokens.dim() == 1:
        tokens = tokens[None]
    out = []
    for row in tokens.tolist():
        words = []
        for t in row:
            if t == EOT:
                break
            if t not in (PAD, SOT):
                words.append(vocab[t] if 0 <= t < len(vocab) else "<unk>")
        out.append(" ".join(words))
    return out


def digit_captions(
    labels: Tensor,
    colours: Tensor,
    backgrounds: Tensor,
    generator: torch.Generator,
    p_colour: float = 0.7,
    p_background: float = 0.5,
    p_numeral: float = 0.3,
) -> list[str]:
    """One caption per image: the digit always (a numeral with probability ``p_numeral``),
    its colour with probability ``p_colour``, the background with ``p_background``."""
    n = len(labels)
    u = torch.rand(n, 4, generator=generator)
    pick = torch.randint(0, 1 << 16, (n,), generator=generator)
    captions = []
    for i in range(n):
        d = int(labels[i])
        names = tuple(k for k, on in (("c", u[i, 0] < p_colour), ("b", u[i, 1] < p_background)) if on)
        group = _TEMPLATES[names]
        captions.append(
            _fill(
                group[int(pick[i]) % len(group)],
                d=str(d) if u[i, 2] < p_numeral else DIGIT_WORDS[d],
                c=COLOUR_NAMES[int(colours[i])],
                b=BACKGROUND_NAMES[int(backgrounds[i])],
            )
        )
    return captions


def class_prompts(words: Sequence[str], templates: Sequence[str], key: str) -> list[list[str]]:
    """``[[template.format(key=word) for template in templates] for word in words]``."""
    return [[_fill(t, **{key: w}) for t in templates] for w in words]


__all__ = [
    "tokenize",
    "decode",
    "build_vocab",
    "check_vocab",
    "split_words",
    "digit_captions",
    "class_prompts",
    "VOCAB",
    "CONTEXT_LENGTH",
    "DIGIT_WORDS",
    "COLOUR_NAMES",
    "COLOUR_HUES",
    "BACKGROUND_NAMES",
    "DIGIT_PROMPTS",
    "COLOUR_PROMPTS",
]
