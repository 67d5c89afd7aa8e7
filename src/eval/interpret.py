"""Interpretability views of the hard keep mask: heat maps, token views and drop statistics.

Terms used below, per layer, for a sequence scored with the hard mask (alpha = inf):

- token j is *dropped* for query k when log I[k, j] is at the floor; dropped tokens stay dropped for
  every later query, so each token has a *drop step*: the first query that drops it (-1 = never);
- query k *triggers* the drops of the tokens whose drop step is k;
- the *drop rate* of a token class is the share of valid pairs (k, j) with j in that class that are
  dropped (valid pairs as in `src.dcp.keep_mask.valid_pairs`, so the overall rate is the sparsity).

Token classes: `speaker` (part of a "NAME:" speaker line), `punctuation`, `function` (a word in
`FUNCTION_WORDS`), `content` (any other word or number) and `whitespace` (newlines and spaces).
"""

import html
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.dcp.keep_mask import LOG_KEEP_FLOOR, valid_pairs
from src.eval.local_tasks import FUNCTION_WORDS

logger = logging.getLogger(__name__)

TOKEN_CLASSES = ("speaker", "punctuation", "function", "content", "whitespace")

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")
# A capitalised speaker name at the start of a paragraph (or of the passage), followed by a colon.
# A passage that starts inside a line can still misread a capitalised "Word:" there as a speaker.
_SPEAKER = re.compile(r"(?:\A|(?<=\n\n))(?P<name>[A-Z][^\[\]:\n]{0,40}?):(?=\s)")


@dataclass
class Passage:
    """A scored token sequence: ids, per-token text pieces, classes, and which tokens were generated."""

    ids: list[int]
    pieces: list[str]
    classes: list[str]
    generated: list[bool] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Tokens and classes.


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Decode each token on its own, so that the pieces concatenate to the passage text."""
    return [tokenizer.decode([token_id]) for token_id in ids]


def classify_pieces(pieces: Sequence[str]) -> list[str]:
    """Assign each token piece one of TOKEN_CLASSES, looking at the word it belongs to."""
    text = "".join(pieces)
    char_class: list[str | None] = [None] * len(text)
    for match in _WORD.finditer(text):
        word = match.group(0).lower()
        label = "function" if word in FUNCTION_WORDS else "content"
        char_class[match.start() : match.end()] = [label] * (match.end() - match.start())
    for match in _SPEAKER.finditer(text):
        char_class[match.start("name") : match.end("name")] = ["speaker"] * len(match.group("name"))

    classes = []
    offset = 0
    for piece in pieces:
        labels = [char_class[index] for index in range(offset, offset + len(piece)) if char_class[index] is not None]
        if "speaker" in labels:
            classes.append("speaker")
        elif labels:
            classes.append(labels[0])
        elif piece.strip():
            classes.append("punctuation")
        else:
            classes.append("whitespace")
        offset += len(piece)
    return classes


def make_passage(tokenizer: Any, ids: Sequence[int], generated_from: int | None = None) -> Passage:
    """Build a Passage; tokens at index >= generated_from are marked as generated."""
    pieces = token_pieces(tokenizer, ids)
    start = len(ids) if generated_from is None else generated_from
    return Passage(list(ids), pieces, classify_pieces(pieces), [index >= start for index in range(len(ids))])


# ---------------------------------------------------------------------------------------------
# Masks.


@torch.no_grad()
def dropped_masks(model: torch.nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    """Run the model on unpadded rows (B, T) and return dropped[l, b, k, j] (L, B, T, T) bool.

    A dense model without keep policy drops nothing, so its layers come back all False.
    """
    output = model(input_ids=input_ids.to(model.device), return_log_keep=True)
    batch, length = input_ids.shape
    lower = torch.ones(length, length, dtype=torch.bool).tril(-1)
    dropped = []
    for log_keep in output.log_keep:
        if log_keep is None:
            dropped.append(torch.zeros(batch, length, length, dtype=torch.bool))
        else:
            dropped.append((log_keep.cpu() <= LOG_KEEP_FLOOR / 2) & lower)
    return torch.stack(dropped).numpy()


def drop_steps(dropped: np.ndarray) -> np.ndarray:
    """Return the first query that drops each token, (..., T) int, -1 for never.

    dropped: (..., T, T) over (query k, key j). Raises ValueError if a token is dropped and kept
    again later, because then a single drop step does not describe the mask.
    """
    reappears = dropped[..., :-1, :] & ~dropped[..., 1:, :]
    if reappears.any():
        raise ValueError("the keep mask is not monotone along the query axis: a dropped token is kept again later")
    ever = dropped.any(axis=-2)
    first = dropped.argmax(axis=-2)
    return np.where(ever, first, -1)


def masks_from_steps(steps: np.ndarray) -> np.ndarray:
    """Invert drop_steps: (..., T) steps -> dropped (..., T, T) bool."""
    length = steps.shape[-1]
    queries = np.arange(length)[:, None]
    return (steps[..., None, :] >= 0) & (queries >= steps[..., None, :])


# ---------------------------------------------------------------------------------------------
# Statistics.


def _valid(length: int) -> np.ndarray:
    return valid_pairs(torch.ones(1, length, dtype=torch.bool))[0].numpy()


def drop_statistics(dropped: np.ndarray, classes: Sequence[Sequence[str]], pieces: Sequence[Sequence[str]], top: int = 20, min_count: int = 5) -> dict[str, Any]:
    """Aggregate drop rates and triggers over passages.

    dropped: (L, N, T, T) bool for N unpadded passages of length T; classes, pieces: N lists of T.
    """
    layers, _, length, _ = dropped.shape
    valid = _valid(length)  # (T, T)
    key_class = np.array(classes)  # (N, T)
    steps = drop_steps(dropped)  # (L, N, T)

    stats: dict[str, Any] = {"layers": layers, "passages": len(classes), "length": length}
    stats["layer_sparsity"] = [float((dropped[layer] & valid).sum() / (valid.sum() * len(classes))) for layer in range(layers)]
    stats["sparsity"] = float(np.mean(stats["layer_sparsity"]))
    stats["token_counts"] = {name: int((key_class == name).sum()) for name in TOKEN_CLASSES}
    stats["drop_rate_by_class"] = _drop_rate_by_class(dropped, valid, key_class)
    stats["triggers_by_class"] = _triggers_by_class(steps, key_class)
    stats["trigger_target"] = _trigger_target(steps, key_class)
    stats["top_triggers"] = _top_triggers(steps, pieces, top, min_count)
    return stats


def _drop_rate_by_class(dropped: np.ndarray, valid: np.ndarray, key_class: np.ndarray) -> dict[str, list[float | None]]:
    """Per class, per layer: dropped valid pairs / valid pairs whose key is in the class."""
    result = {}
    for name in TOKEN_CLASSES:
        in_class = (key_class == name)[:, None, :] & valid[None]  # (N, T, T)
        pairs = in_class.sum()
        result[name] = [float((dropped[layer] & in_class).sum() / pairs) if pairs else None for layer in range(dropped.shape[0])]
    return result


def _triggers_by_class(steps: np.ndarray, key_class: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Per query class: mean drops triggered per token, and its share of all drops (over layers)."""
    layers, passages, length = steps.shape
    triggered = np.zeros((layers, passages, length))  # drops triggered by each query
    for layer in range(layers):
        for passage in range(passages):
            hits = steps[layer, passage][steps[layer, passage] >= 0]
            np.add.at(triggered[layer, passage], hits, 1)

    total = triggered.sum()
    result = {}
    for name in TOKEN_CLASSES:
        in_class = key_class == name  # (N, T)
        count = in_class.sum() * layers
        drops = triggered[:, in_class].sum()
        result[name] = {
            "mean_drops_per_token": float(drops / count) if count else None,
            "share_of_drops": float(drops / total) if total else None,
        }
    return result


def _trigger_target(steps: np.ndarray, key_class: np.ndarray) -> dict[str, dict[str, int]]:
    """Counts of drops by (class of the triggering query, class of the dropped token), over layers."""
    counts = {query: dict.fromkeys(TOKEN_CLASSES, 0) for query in TOKEN_CLASSES}
    layers, passages, length = steps.shape
    for layer in range(layers):
        for passage in range(passages):
            for token in np.flatnonzero(steps[layer, passage] >= 0):
                query = steps[layer, passage, token]
                counts[key_class[passage, query]][key_class[passage, token]] += 1
    return counts


def _top_triggers(steps: np.ndarray, pieces: Sequence[Sequence[str]], top: int, min_count: int) -> list[dict[str, Any]]:
    """Token strings that trigger the most drops per occurrence (averaged over layers)."""
    layers = steps.shape[0]
    drops: dict[str, float] = {}
    occurrences: dict[str, int] = {}
    for passage, passage_pieces in enumerate(pieces):
        triggered = np.zeros(len(passage_pieces))
        for layer in range(layers):
            hits = steps[layer, passage][steps[layer, passage] >= 0]
            np.add.at(triggered, hits, 1)
        for index, piece in enumerate(passage_pieces):
            drops[piece] = drops.get(piece, 0.0) + triggered[index] / layers
            occurrences[piece] = occurrences.get(piece, 0) + 1

    rows = [
        {"token": piece, "occurrences": occurrences[piece], "mean_drops": drops[piece] / occurrences[piece]}
        for piece in drops
        if occurrences[piece] >= min_count
    ]
    rows.sort(key=lambda row: (-row["mean_drops"], row["token"]))
    return rows[:top]


def statistics_markdown(stats: dict[str, Any], title: str) -> str:
    """Render drop statistics as markdown tables."""
    layers = stats["layers"]
    lines = [f"# {title}", ""]
    lines.append(f"{stats['passages']} passages of {stats['length']} tokens; sparsity {stats['sparsity']:.3f} (mean over layers).")
    lines += ["", "## Drop rate by token class and layer", ""]
    lines.append("| class | tokens | " + " | ".join(f"layer {layer}" for layer in range(layers)) + " |")
    lines.append("|---|---:|" + "---:|" * layers)
    lines.append("| all | " + f"{sum(stats['token_counts'].values())} | " + " | ".join(f"{value:.3f}" for value in stats["layer_sparsity"]) + " |")
    for name, rates in stats["drop_rate_by_class"].items():
        cells = " | ".join("-" if value is None else f"{value:.3f}" for value in rates)
        lines.append(f"| {name} | {stats['token_counts'][name]} | {cells} |")

    lines += ["", "## Which tokens trigger drops", "", "| query class | drops per token | share of drops |", "|---|---:|---:|"]
    for name, row in stats["triggers_by_class"].items():
        mean = "-" if row["mean_drops_per_token"] is None else f"{row['mean_drops_per_token']:.2f}"
        share = "-" if row["share_of_drops"] is None else f"{row['share_of_drops']:.3f}"
        lines.append(f"| {name} | {mean} | {share} |")

    lines += ["", "Drops by triggering class (rows) and dropped class (columns), summed over layers:", ""]
    lines.append("| trigger \\ dropped | " + " | ".join(TOKEN_CLASSES) + " |")
    lines.append("|---|" + "---:|" * len(TOKEN_CLASSES))
    for query, row in stats["trigger_target"].items():
        lines.append(f"| {query} | " + " | ".join(str(row[name]) for name in TOKEN_CLASSES) + " |")

    lines += ["", "## Top trigger tokens (drops per occurrence, mean over layers)", "", "| token | occurrences | drops |", "|---|---:|---:|"]
    for row in stats["top_triggers"]:
        lines.append(f"| `{_visible(row['token'])}` | {row['occurrences']} | {row['mean_drops']:.2f} |")
    return "\n".join(lines) + "\n"


def _visible(piece: str) -> str:
    return piece.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


# ---------------------------------------------------------------------------------------------
# Figures and the HTML view.


def plot_keep_masks(dropped: np.ndarray, path: Path, title: str, pieces: Sequence[str] | None = None) -> None:
    """Save per-layer heat maps of one passage's mask (L, T, T): kept, dropped, and future pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, length, _ = dropped.shape
    columns = min(layers, 4)
    rows = math.ceil(layers / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.6 * rows + 0.6), squeeze=False)
    future = np.triu(np.ones((length, length), dtype=bool), 1)
    valid = _valid(length)

    for layer in range(layers):
        axis = axes[layer // columns][layer % columns]
        image = np.where(dropped[layer], 0.0, 1.0)
        image = np.ma.masked_array(image, mask=future)
        axis.imshow(image, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        sparsity = (dropped[layer] & valid).sum() / max(valid.sum(), 1)
        axis.set_title(f"layer {layer}: sparsity {sparsity:.2f}", fontsize=9)
        axis.set_xlabel("key j", fontsize=8)
        axis.set_ylabel("query k", fontsize=8)
        if pieces is not None and length <= 48:
            labels = [_visible(piece) for piece in pieces]
            axis.set_xticks(range(length), labels, rotation=90, fontsize=5)
            axis.set_yticks(range(length), labels, fontsize=5)
    for index in range(layers, rows * columns):
        axes[index // columns][index % columns].axis("off")

    figure.suptitle(f"{title}\nyellow: kept, purple: dropped, white: future", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _layout(pieces: Sequence[str], width: int) -> list[list[tuple[int, int, str]]]:
    """Place each piece on a character grid: per token a list of (row, column, text) segments."""
    placed = []
    row, column = 0, 0
    for piece in pieces:
        segments = []
        parts = piece.split("\n")
        for number, part in enumerate(parts):
            if number > 0:
                row, column = row + 1, 0
            if column + len(part) > width and column > 0:
                row, column = row + 1, 0
            if part:
                segments.append((row, column, part))
            column += len(part)
        placed.append(segments)
    return placed


def plot_token_view(passage: Passage, steps: np.ndarray, path: Path, title: str, width: int = 100, fontsize: float = 7.0) -> None:
    """Save the passage once per layer: tokens dropped for the last query are grey and struck through,
    tokens that trigger drops are bold (red in the prompt) and generated tokens are blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, length = steps.shape
    placed = _layout(passage.pieces, width)
    text_rows = max((segment[0] for segments in placed for segment in segments), default=0) + 1
    char_inches = 0.6 * fontsize / 72.0  # monospace advance is about 0.6 em
    row_inches = 1.45 * fontsize / 72.0
    figure, axes = plt.subplots(layers, 1, figsize=(width * char_inches + 0.4, layers * (text_rows * row_inches + 0.45)), squeeze=False)

    for layer in range(layers):
        axis = axes[layer][0]
        axis.set_xlim(0, width)
        axis.set_ylim(text_rows, 0)
        axis.axis("off")
        dropped_count = int((steps[layer] >= 0).sum())
        axis.set_title(f"layer {layer}: {dropped_count} of {length - 1} earlier tokens dropped for the last token", fontsize=8, loc="left")
        triggers = np.bincount(steps[layer][steps[layer] >= 0], minlength=length)
        for index, segments in enumerate(placed):
            dropped = steps[layer, index] >= 0  # dropped tokens stay dropped, so also for the last query
            if dropped:
                color = "#9a9a9a"
            elif passage.generated[index]:
                color = "#1f5fbf"
            else:
                color = "#c0392b" if triggers[index] > 0 else "black"
            weight = "bold" if triggers[index] > 0 else "normal"
            for row, column, text in segments:
                axis.text(column, row + 0.8, text, family="monospace", fontsize=fontsize, color=color, fontweight=weight)
                if dropped:
                    axis.plot([column, column + len(text)], [row + 0.45, row + 0.45], color="#9a9a9a", linewidth=0.6)

    figure.suptitle(f"{title}\ngrey struck: dropped for the last token; bold: triggered drops (red in the prompt); blue: generated", fontsize=9)
    figure.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / figure.get_figheight()))
    figure.savefig(path, dpi=130)
    plt.close(figure)


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.layer {{ font-family: monospace; white-space: pre-wrap; border: 1px solid #ccc; padding: 0.6em; margin-bottom: 1em; line-height: 1.5; }}
.t {{ cursor: pointer; }}
.generated {{ color: #1f5fbf; }}
.dropped {{ color: #aaa; text-decoration: line-through; }}
.new {{ background: #f6c4bd; color: #000; text-decoration: line-through; }}
.query {{ outline: 2px solid #c0392b; }}
</style></head><body>
<h1>{title}</h1>
<p>Hover over a token to see the context of that query in each layer: <span class="dropped">grey struck</span>
tokens are dropped for it, <span class="new">red</span> ones are dropped by this very token. Without hovering the view
shows the last token. <span class="generated">Blue</span> tokens were generated.</p>
{layers}
<script>
const steps = {steps};
function show(query) {{
  document.querySelectorAll('.layer').forEach(function (div) {{
    const layer = Number(div.dataset.layer);
    div.querySelectorAll('.t').forEach(function (span) {{
      const key = Number(span.dataset.i);
      const step = steps[layer][key];
      span.classList.toggle('dropped', step >= 0 && step < query);
      span.classList.toggle('new', step === query);
      span.classList.toggle('query', key === query);
    }});
  }});
}}
document.querySelectorAll('.t').forEach(function (span) {{
  span.addEventListener('mouseenter', function () {{ show(Number(span.dataset.i)); }});
}});
document.querySelectorAll('.layer').forEach(function (div) {{
  div.addEventListener('mouseleave', function () {{ show({last}); }});
}});
show({last});
</script></body></html>
"""


def write_token_view_html(passage: Passage, steps: np.ndarray, path: Path, title: str) -> None:
    """Write a self-contained HTML page with one interactive view of the passage per layer."""
    layers = []
    for layer in range(steps.shape[0]):
        triggers = np.bincount(steps[layer][steps[layer] >= 0], minlength=steps.shape[1])
        spans = []
        for index, piece in enumerate(passage.pieces):
            css = "t generated" if passage.generated[index] else "t"
            tooltip = f"#{index} {passage.classes[index]}, drops {int(triggers[index])}"
            spans.append(f'<span class="{css}" data-i="{index}" title="{html.escape(tooltip)}">{html.escape(piece)}</span>')
        layers.append(f'<h2>Layer {layer}</h2>\n<div class="layer" data-layer="{layer}">{"".join(spans)}</div>')

    page = _HTML_TEMPLATE.format(title=html.escape(title), layers="\n".join(layers), steps=json.dumps(steps.tolist()), last=steps.shape[1] - 1)
    path.write_text(page, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Passages and the stage.


def passage_ids(tokenizer: Any, text: str, offset: int, length: int) -> list[int]:
    """Tokenise `length` tokens of `text` from the first line start at or after `offset`."""
    if offset > 0:
        newline = text.find("\n", offset - 1)
        offset = newline + 1 if newline != -1 else offset
    # Four characters per token is typical; take twice that so that `length` tokens are available.
    ids = tokenizer(text[offset : offset + 8 * length])["input_ids"]
    if len(ids) < length:
        raise ValueError(f"the passage at offset {offset} has only {len(ids)} tokens, fewer than {length}; use a smaller offset")
    return ids[:length]


def statistics_passages(tokenizer: Any, texts: Sequence[str], length: int, count: int) -> list[list[int]]:
    """Cut the documents into `length`-token windows and return `count` of them, evenly spaced."""
    windows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        windows += [ids[start : start + length] for start in range(0, len(ids) - length + 1, length)]
    if not windows:
        raise ValueError(f"the documents hold no window of {length} tokens")
    picks = np.unique(np.linspace(0, len(windows) - 1, num=min(count, len(windows))).round().astype(int))
    return [windows[index] for index in picks]


@torch.no_grad()
def generate_greedy(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """Append `new_tokens` greedy tokens, running the full sequence with the hard mask at every step.

    The full-sequence forward is what the pruned KV cache must reproduce, so the view shows the same
    drops a cached decoder would make.
    """
    ids = list(ids)
    for _ in range(new_tokens):
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits  # (1, T, V)
        ids.append(int(logits[0, -1].argmax()))
    return ids


def _read_texts(path: Path) -> list[str]:
    from src.eval.local_tasks import read_documents

    return [document["text"] for document in read_documents(path)]


def run_stage(cfg: Any) -> dict[str, Any]:
    """Write heat maps, token views and drop statistics of one model to cfg.out_dir."""
    from src.eval.baselines import apply_keep_policy, describe_policy, policy_from_config
    from src.eval.zero_shot import default_tag, load_model, pick_device

    settings = cfg.interpret
    model_dir = Path(cfg.model_dir)
    model, tokenizer = load_model(model_dir, pick_device(cfg.device))
    tag = cfg.get("tag") or default_tag(model_dir)
    context = model.config.n_positions
    policy = policy_from_config(cfg.get("baseline"), default_length=context)
    if policy is not None:
        apply_keep_policy(model, policy)

    length = int(settings.passage_tokens or context)
    if length > context:
        raise ValueError(f"interpret.passage_tokens={length} exceeds the model context of {context} tokens")
    prompt_length = min(length, context - int(settings.generate_tokens))
    if prompt_length < 1:
        raise ValueError(f"interpret.generate_tokens={settings.generate_tokens} leaves no room for a prompt in {context} tokens")
    texts = _read_texts(Path(cfg.documents))
    if not 0 <= settings.passage_document < len(texts):
        raise ValueError(f"interpret.passage_document={settings.passage_document} is out of range: {len(texts)} documents in {cfg.documents}")

    output_dir = Path(cfg.get("out_dir") or f"reports/interpret/{tag}")
    output_dir.mkdir(parents=True, exist_ok=True)
    title = tag + (f" ({policy.name})" if policy is not None else "")

    ids = passage_ids(tokenizer, texts[settings.passage_document], settings.passage_offset, prompt_length)
    if settings.generate_tokens:
        ids = generate_greedy(model, ids, int(settings.generate_tokens))
    passage = make_passage(tokenizer, ids, generated_from=prompt_length)
    view = write_passage_views(model, passage, output_dir, title)

    windows = statistics_passages(tokenizer, texts, length, settings.num_passages)
    stats = passage_statistics(model, tokenizer, windows, settings.batch_size, settings.top_triggers, settings.min_trigger_count)
    stats.update(tag=tag, model_dir=str(model_dir), baseline=describe_policy(policy) if policy is not None else None, passage=view)
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (output_dir / "stats.md").write_text(statistics_markdown(stats, f"Drop statistics: {title}"))
    logger.info("wrote interpretability views and statistics to %s (sparsity %.3f)", output_dir, stats["sparsity"])
    return stats


def write_passage_views(model: torch.nn.Module, passage: Passage, output_dir: Path, title: str) -> dict[str, Any]:
    """Write keep_masks.png, token_view.png, token_view.html and token_view.json for one passage."""
    dropped = dropped_masks(model, torch.tensor([passage.ids]))[:, 0]  # (L, T, T)
    steps = drop_steps(dropped)  # (L, T)

    plot_keep_masks(dropped, output_dir / "keep_masks.png", title, passage.pieces)
    plot_token_view(passage, steps, output_dir / "token_view.png", title)
    write_token_view_html(passage, steps, output_dir / "token_view.html", title)

    valid = _valid(dropped.shape[-1])
    view = {
        "tokens": len(passage.ids),
        "generated_tokens": int(sum(passage.generated)),
        "layer_sparsity": [float((dropped[layer] & valid).sum() / max(valid.sum(), 1)) for layer in range(dropped.shape[0])],
    }
    record = {**view, "ids": passage.ids, "pieces": passage.pieces, "classes": passage.classes, "generated": passage.generated, "drop_steps": steps.tolist()}
    (output_dir / "token_view.json").write_text(json.dumps(record) + "\n")
    return view


def passage_statistics(model: torch.nn.Module, tokenizer: Any, windows: Sequence[list[int]], batch_size: int, top: int, min_count: int) -> dict[str, Any]:
    """Run the windows in batches and aggregate drop statistics over all of them."""
    dropped = []
    for first in range(0, len(windows), batch_size):
        batch = torch.tensor(windows[first : first + batch_size])
        dropped.append(dropped_masks(model, batch))
    masks = np.concatenate(dropped, axis=1)  # (L, N, T, T)

    pieces = [token_pieces(tokenizer, ids) for ids in windows]
    classes = [classify_pieces(window_pieces) for window_pieces in pieces]
    return drop_statistics(masks, classes, pieces, top=top, min_count=min_count)
