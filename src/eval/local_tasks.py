"""Zero-shot tasks generated from held-out plays, for offline runs of lm-evaluation-harness.

The input is a split file of the prepared corpus (`data/prepared/<name>/test.jsonl`, one JSON
document per line with "title" and "text"). Play text has paragraphs separated by blank lines, and a
speech is a paragraph that starts with the speaker's name and a colon, either alone on its line
("SHALLOW:\\nSir Hugh, persuade me not;") or followed by the first spoken line ("SHALLOW: Sir Hugh").
Other paragraphs (titles, act and scene headings, bracketed stage directions) stay in the contexts
but never become questions.

Three tasks, each a JSON-lines file whose contexts are exact slices of the document text:

- `next_line` (multiple choice): the text before a spoken line, ending with its newline. The choices
  are that line and three other lines by the same speaker in the same play (by any speaker of the
  play when that speaker has too few).
- `speaker` (multiple choice): the text before a speech, ending with the blank line; choices are
  "NAME:" for the true speaker and three other speakers of nearby speeches of the same play.
- `cloze` (loglikelihood, as LAMBADA): a spoken line without its last word, which is a content word
  of at least four letters that already occurs in the context; the target is that word after a
  space. Accuracy is greedy match of the whole word.

Generation is deterministic: the same input file, settings and seed give byte-identical files.
"""

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TASK_FILES = {"next_line": "next_line.jsonl", "speaker": "speaker.jsonl", "cloze": "cloze.jsonl"}
MANIFEST = "manifest.json"
NUM_CHOICES = 4

# Function words of modern and early modern English, lower case; used to exclude cloze targets and
# to classify tokens in the interpretability statistics.
FUNCTION_WORDS = frozenset(
    """
    a an the and or but nor so yet for if then than as at by in of on to up with from into onto upon
    out off over under about above after before below between through during without within against
    among along around across behind beyond toward towards till until unto since while whilst though
    although because whether where when whence whither why how what which who whom whose that this
    these those there here thence hence i me my mine myself we us our ours ourselves you your yours
    yourself yourselves thou thee thy thine thyself ye he him his himself she her hers herself it its
    itself they them their theirs themselves one ones is am are was were be been being art wast wert
    have has had having hath hast didst dost doth do does did done shall shalt should shouldst will
    wilt would wouldst may mayst might mightst must can canst could couldst not no nay ay yea o oh
    all any some each every both either neither such own same other another more most much many
    few very too also only just even still ere eer oft e'en 'tis 'twas t is s d ll th
    """.split()
)

_SPEAKER_ALONE = re.compile(r"^(?P<name>[A-Za-z][^\[\]:\n]{0,40}?):\s*$")
_SPEAKER_INLINE = re.compile(r"^(?P<name>[A-Z][^\[\]:\n]{0,40}?):\s+(?P<rest>\S.*)$")
_LAST_WORD = re.compile(r"(?P<word>[A-Za-z][A-Za-z'-]*[A-Za-z])(?P<tail>[^A-Za-z]*)$")


@dataclass
class Line:
    """One spoken line: its text and its [start, end) character offsets in the document."""

    text: str
    start: int
    end: int


@dataclass
class Speech:
    """A speech paragraph: the speaker's name, where the paragraph starts, and its spoken lines."""

    speaker: str
    start: int
    lines: list[Line] = field(default_factory=list)


@dataclass
class Play:
    """A parsed document: its title, full text and speeches in order."""

    title: str
    text: str
    speeches: list[Speech]


# ---------------------------------------------------------------------------------------------
# Parsing.


def _paragraphs(text: str) -> Iterable[list[tuple[str, int]]]:
    """Yield paragraphs as lists of (line without newline, start offset)."""
    paragraph: list[tuple[str, int]] = []
    offset = 0
    for raw in text.splitlines(keepends=True):
        line = raw.rstrip("\r\n")
        if line.strip():
            paragraph.append((line, offset))
        elif paragraph:
            yield paragraph
            paragraph = []
        offset += len(raw)
    if paragraph:
        yield paragraph


def _parse_speech(paragraph: list[tuple[str, int]]) -> Speech | None:
    first, first_start = paragraph[0]
    alone = _SPEAKER_ALONE.match(first)
    if alone:
        lines = [Line(text, start, start + len(text)) for text, start in paragraph[1:]]
        return Speech(alone.group("name").strip(), first_start, lines) if lines else None

    inline = _SPEAKER_INLINE.match(first)
    if inline:
        rest_start = first_start + inline.start("rest")
        lines = [Line(inline.group("rest"), rest_start, first_start + len(first))]
        lines += [Line(text, start, start + len(text)) for text, start in paragraph[1:]]
        return Speech(inline.group("name").strip(), first_start, lines)
    return None


def parse_play(title: str, text: str, min_speeches_per_speaker: int = 2) -> Play:
    """Find the speeches of a play; names that start fewer than `min_speeches_per_speaker`
    paragraphs are treated as ordinary text (this filters lines that merely contain a colon)."""
    candidates = [speech for paragraph in _paragraphs(text) if (speech := _parse_speech(paragraph))]

    counts: dict[str, int] = {}
    for speech in candidates:
        counts[speech.speaker] = counts.get(speech.speaker, 0) + 1
    speeches = [speech for speech in candidates if counts[speech.speaker] >= min_speeches_per_speaker]
    return Play(title=title, text=text, speeches=speeches)


def read_documents(path: Path) -> list[dict]:
    """Read a split's documents ({"title", "text"} per line) from a JSON-lines file."""
    if not path.exists():
        raise FileNotFoundError(
            f"held-out documents not found at {path}. Run the prepare stage first (python -m src.prepare) "
            "or point the config at an existing {split}.jsonl."
        )
    documents = []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record = json.loads(raw)
            if "text" not in record:
                raise ValueError(f"{path}:{number} has no 'text' field; each line must be a JSON document with 'title' and 'text'")
            documents.append(record)
    return documents


# ---------------------------------------------------------------------------------------------
# Contexts and examples.


def context_start(text: str, end: int, max_chars: int) -> int:
    """Return where a context of at most `max_chars` characters ending at `end` starts.

    The start moves forward to a line start, unless the window contains no line break.
    """
    start = max(0, end - max_chars)
    if start == 0:
        return 0
    newline = text.find("\n", start, end)
    return newline + 1 if newline != -1 and newline + 1 < end else start


def _words(text: str) -> set[str]:
    return {word.lower() for word in re.findall(r"[A-Za-z][A-Za-z'-]*[A-Za-z]", text)}


def _pick_distractors(rng: np.random.Generator, pool: Sequence[str], exclude: set[str], count: int) -> list[str]:
    """Draw `count` distinct strings from `pool` that are not in `exclude` (fewer if the pool is short)."""
    options = sorted(set(pool) - exclude)
    if len(options) <= count:
        return options
    picked = rng.choice(len(options), size=count, replace=False)
    return [options[index] for index in sorted(picked)]


def _multiple_choice(rng: np.random.Generator, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    order = rng.permutation(len(choices))
    shuffled = [choices[index] for index in order]
    return shuffled, int(np.flatnonzero(order == 0)[0])


def _next_line_candidates(play: Play, min_words: int) -> list[tuple[int, int]]:
    """(speech index, line index) of lines that follow another line of the same speech."""
    return [
        (s, i)
        for s, speech in enumerate(play.speeches)
        for i, line in enumerate(speech.lines)
        if i >= 1 and len(line.text.split()) >= min_words
    ]


def next_line_examples(play: Play, doc: int, rng: np.random.Generator, context_chars: int, min_words: int) -> list[dict]:
    """Build every next-line question of one play (the caller samples from them)."""
    by_speaker: dict[str, list[str]] = {}
    every_line: list[str] = []
    for speech in play.speeches:
        for line in speech.lines:
            if len(line.text.split()) >= min_words:
                by_speaker.setdefault(speech.speaker, []).append(line.text)
                every_line.append(line.text)

    examples = []
    for s, i in _next_line_candidates(play, min_words):
        speech = play.speeches[s]
        line = speech.lines[i]
        exclude = {line.text}
        distractors = _pick_distractors(rng, by_speaker[speech.speaker], exclude, NUM_CHOICES - 1)
        if len(distractors) < NUM_CHOICES - 1:
            distractors += _pick_distractors(rng, every_line, exclude | set(distractors), NUM_CHOICES - 1 - len(distractors))
        if len(distractors) < NUM_CHOICES - 1:
            continue

        start = context_start(play.text, line.start, context_chars)
        choices, label = _multiple_choice(rng, line.text, distractors)
        examples.append(
            {"doc": doc, "play": play.title, "offset": line.start, "context": play.text[start : line.start], "choices": choices, "label": label}
        )
    return examples


def speaker_examples(play: Play, doc: int, rng: np.random.Generator, context_chars: int, neighbourhood: int) -> list[dict]:
    """Build every next-speaker question of one play; distractors come from the nearest speeches."""
    examples = []
    for s, speech in enumerate(play.speeches):
        if s == 0:
            continue
        low, high = max(0, s - neighbourhood), min(len(play.speeches), s + neighbourhood + 1)
        nearby = [play.speeches[n].speaker for n in range(low, high)]
        distractors = _pick_distractors(rng, nearby, {speech.speaker}, NUM_CHOICES - 1)
        if len(distractors) < NUM_CHOICES - 1:
            everyone = [other.speaker for other in play.speeches]
            distractors += _pick_distractors(rng, everyone, {speech.speaker} | set(distractors), NUM_CHOICES - 1 - len(distractors))
        if len(distractors) < NUM_CHOICES - 1:
            continue

        start = context_start(play.text, speech.start, context_chars)
        choices, label = _multiple_choice(rng, f"{speech.speaker}:", [f"{name}:" for name in distractors])
        examples.append(
            {"doc": doc, "play": play.title, "offset": speech.start, "context": play.text[start : speech.start], "choices": choices, "label": label}
        )
    return examples


def cloze_examples(play: Play, doc: int, context_chars: int, min_letters: int) -> list[dict]:
    """Build every cloze question of one play: last content words that already occur in the context."""
    examples = []
    for speech in play.speeches:
        for line in speech.lines:
            match = _LAST_WORD.search(line.text)
            if match is None or match.start("word") == 0:
                continue  # single-word lines have no space before the target
            word = match.group("word")
            if len(word) < min_letters or word.lower() in FUNCTION_WORDS:
                continue

            word_start = line.start + match.start("word")
            start = context_start(play.text, word_start, context_chars)
            context = play.text[start:word_start]
            if not context.endswith(" ") or word.lower() not in _words(context):
                continue
            examples.append({"doc": doc, "play": play.title, "offset": word_start, "context": context.rstrip(" "), "target": f" {word}"})
    return examples


# ---------------------------------------------------------------------------------------------
# Writing the task files.


def _sample(rng: np.random.Generator, examples: list[dict], limit: int | None) -> list[dict]:
    """Keep at most `limit` examples, drawn without replacement, in document order."""
    if limit is not None and len(examples) > limit:
        picked = sorted(rng.choice(len(examples), size=limit, replace=False))
        examples = [examples[index] for index in picked]
    return [{"id": number, **example} for number, example in enumerate(examples)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def generate_local_tasks(
    documents_path: Path,
    output_dir: Path,
    max_examples: int | None = 200,
    context_chars: int = 600,
    seed: int = 1234,
    min_line_words: int = 4,
    cloze_min_letters: int = 4,
    speaker_neighbourhood: int = 20,
) -> dict:
    """Write next_line.jsonl, speaker.jsonl, cloze.jsonl and manifest.json to `output_dir`.

    max_examples: examples kept per task (None keeps all). context_chars: the maximum context length
    in characters. Pick it so that contexts fit the model's window: the built-in 4096-token BPE
    averages 3.0 characters per token on the four test plays. Returns the manifest.
    """
    if context_chars < 1:
        raise ValueError(f"context_chars must be positive, got {context_chars}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be positive or null (all), got {max_examples}")

    documents = read_documents(Path(documents_path))
    plays = [parse_play(str(doc.get("title", "")), doc["text"]) for doc in documents]
    if not any(play.speeches for play in plays):
        raise ValueError(
            f"no speeches found in {documents_path}: expected paragraphs that start with 'NAME:' "
            "followed by spoken lines, separated by blank lines"
        )

    rng = np.random.default_rng(seed)
    pools: dict[str, list[dict]] = {name: [] for name in TASK_FILES}
    for doc, play in enumerate(plays):
        pools["next_line"] += next_line_examples(play, doc, rng, context_chars, min_line_words)
        pools["speaker"] += speaker_examples(play, doc, rng, context_chars, speaker_neighbourhood)
        pools["cloze"] += cloze_examples(play, doc, context_chars, cloze_min_letters)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, filename in TASK_FILES.items():
        rows = _sample(rng, pools[name], max_examples)
        if not rows:
            raise ValueError(f"task {name} has no examples in {documents_path}; the plays are too short or lack speeches")
        _write_jsonl(output_dir / filename, rows)
        counts[name] = {"examples": len(rows), "candidates": len(pools[name])}
        logger.info("local task %s: %d examples from %d candidates", name, len(rows), len(pools[name]))

    manifest = {
        "source": str(documents_path),
        "source_sha256": hashlib.sha256(Path(documents_path).read_bytes()).hexdigest(),
        "plays": [play.title for play in plays],
        "settings": {
            "max_examples": max_examples,
            "context_chars": context_chars,
            "seed": seed,
            "min_line_words": min_line_words,
            "cloze_min_letters": cloze_min_letters,
            "speaker_neighbourhood": speaker_neighbourhood,
        },
        "tasks": counts,
    }
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
