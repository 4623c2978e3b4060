"""`rlhfkit data convert <kind>`: rewrite public human-feedback data sets (OpenAssistant oasst1, Stanford SHP, OpenAI
summarize-from-feedback, PKU-SafeRLHF, NVIDIA HelpSteer2) as the JSON Lines rows rlhfkit's stages read.

    rlhfkit data convert oasst1       --input oasst1.parquet --output rank.jsonl [--lang en] [--sft-output sft.jsonl]
    rlhfkit data convert shp          --input askculinary/train.json --output pairs.jsonl [--min-score-ratio 2]
    rlhfkit data convert summarize    --input comparisons.jsonl --output pairs.jsonl
    rlhfkit data convert pku-saferlhf --input train.jsonl --output pairs.jsonl [--by better|safer]
    rlhfkit data convert helpsteer2   --input train.jsonl.gz --output scores.jsonl [--pairs --attribute helpfulness]

Field names and nesting follow each data set's card. A row that does not fit its card is one DataError naming file,
row and field; rows that fit but carry no usable preference (ties, identical responses, filtered out) are skipped
and counted in the summary line."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import parse_args
from rlhfkit.data.readers import read_rows
from rlhfkit.errors import ConfigError, DataError, UserError

KINDS = ("oasst1", "shp", "summarize", "pku-saferlhf", "helpsteer2")
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
"""HelpSteer2's five attributes, each an integer 0-4, higher is more of it (HelpSteer2 card)."""

SOURCES = {"oasst1": "oasst1", "shp": "shp", "summarize": "summarize_from_feedback",
           "pku-saferlhf": "pku-saferlhf", "helpsteer2": "helpsteer2"}
"""The `source` column each converter writes: where the judgment came from."""

# The TL;DR query format of Stiennon et al. 2020, "Learning to summarize from human feedback": `tldr_task` and
# `cnndm_task` in openai/summarize-from-feedback, summarize_from_feedback/utils/experiment_helpers.py.
REDDIT_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
ARTICLE_TEMPLATE = "Article:\n{article}\n\nTL;DR:\n"

Message = dict[str, str]


@dataclass
class ConvertConfig:
    """`rlhfkit data convert <kind> --input FILE --output OUT.jsonl`: one public data set to rlhfkit's rows."""

    kind: str = ""
    """The data set layout (the word after `rlhfkit data convert`): oasst1 (OpenAssistant/oasst1 message trees ->
    K-way rankings), shp (stanfordnlp/SHP -> pairs), summarize (openai/summarize_from_feedback comparisons ->
    pairs), pku-saferlhf (PKU-Alignment/PKU-SafeRLHF -> pairs), helpsteer2 (nvidia/HelpSteer2 -> scored responses,
    or pairs with --pairs)."""
    input: list[str] = field(default_factory=list)
    """Input files: JSONL (.jsonl, .ndjson, also gzipped .jsonl.gz), JSON (a list, or JSON Lines as SHP ships
    them), Parquet, or a `datasets` save_to_disk directory; several comma-separated files are read in order (all
    of one kind, e.g. SHP's per-subreddit files or oasst1's train and validation)."""
    output: str = ""
    """The JSON Lines file to write (replaced if it exists)."""
    split: str = "train"
    """The split to read from a `datasets` DatasetDict directory."""
    conversational: bool = False
    """shp, summarize, pku-saferlhf, helpsteer2: write the prompt as chat messages (one user turn; HelpSteer2's
    multi-turn prompts split into their turns) and each response as one assistant message, for chat models
    trained through their chat template. oasst1 output is always conversational."""
    margin: Literal["auto", "off", "log_score_ratio", "score_gap"] = "auto"
    """Label margin column. auto: shp writes none, helpsteer2 --pairs writes score_gap. log_score_ratio (shp):
    log(score_ratio), SHP's ratio of comment scores made additive like a reward gap (2x -> 0.69, 10x -> 2.30).
    score_gap (helpsteer2 --pairs): the difference of the ordering scores. off: none."""
    lang: list[str] = field(default_factory=list)
    """oasst1: keep only messages whose `lang` is one of these codes (e.g. en); empty keeps every language."""
    sft_output: str = ""
    """oasst1: also write one SFT conversation per tree, {"messages": [...]}, following the best-ranked reply at
    every turn (the thread ends at its last assistant message)."""
    allow_orphans: bool = False
    """oasst1: skip (and count) messages whose parent is not in the input, with their replies, instead of
    stopping with an error."""
    min_score_ratio: float = 0.0
    """shp: skip pairs whose score_ratio (preferred comment's score over the other's) is below this; the SHP card
    evaluates on pairs with a ratio of 2 or more. 0 keeps all."""
    max_pairs_per_post: int = 0
    """shp: keep at most this many pairs per post_id, those with the largest score_ratio (the SHP card uses no
    more than 5 per post to prevent overfitting). 0 keeps all."""
    reddit_template: str = ""
    """summarize: the prompt of a Reddit (TL;DR) comparison, filled from `info` ({subreddit}, {title}, {post});
    a typed \\n is a newline. Empty: the query format of Stiennon et al. (2020),
    "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"."""
    article_template: str = ""
    """summarize: the prompt of a CNN/DailyMail comparison (info.post empty), filled from `info` ({article},
    {title}, {site}); a typed \\n is a newline. Empty: the query format of Stiennon et al. (2020),
    "Article:\\n{article}\\n\\nTL;DR:\\n"."""
    by: Literal["better", "safer"] = "better"
    """pku-saferlhf: which judgment picks chosen: better_response_id (helpfulness preference, for a reward model)
    or safer_response_id (harmlessness preference, for a cost model as in Safe RLHF)."""
    pairs: bool = False
    """helpsteer2: write preference pairs between responses to the same prompt instead of scored responses; ties
    are skipped and counted."""
    attribute: Literal["helpfulness", "correctness", "coherence", "complexity", "verbosity"] = "helpfulness"
    """helpsteer2 --pairs: the attribute that orders two responses (unless --weights is given)."""
    weights: dict[str, float] = field(default_factory=dict)
    """helpsteer2 --pairs: order responses by this weighted sum of attributes instead, e.g.
    "{helpfulness: 1, correctness: 1, verbosity: -0.5}"."""


# Options that only one kind reads; giving one to another kind is an error rather than silently ignored.
_KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "lang": ("oasst1",), "sft_output": ("oasst1",), "allow_orphans": ("oasst1",),
    "min_score_ratio": ("shp",), "max_pairs_per_post": ("shp",),
    "reddit_template": ("summarize",), "article_template": ("summarize",),
    "by": ("pku-saferlhf",),
    "pairs": ("helpsteer2",), "attribute": ("helpsteer2",), "weights": ("helpsteer2",),
    "conversational": ("shp", "summarize", "pku-saferlhf", "helpsteer2"),
}


@dataclass
class ConvertReport:
    """What a conversion read, wrote and skipped (nothing is dropped without a count)."""

    kind: str
    output: str
    rows_read: int = 0
    written: int = 0
    unit: str = "pairs"
    skipped: Counter = field(default_factory=Counter)
    """reason -> rows (or messages, or groups) left out."""
    notes: Counter = field(default_factory=Counter)
    """reason -> count of things worth knowing that did not drop a row."""
    sft_output: str = ""
    sft_written: int = 0

    def summary(self) -> str:
        unit = self.unit[:-1] if self.written == 1 else self.unit  # "1 pair", "2 pairs"
        line = (f"rlhfkit data convert {self.kind}: read {self.rows_read} rows; wrote {self.written} {unit} to "
                f"{self.output}")
        if self.sft_output:
            line += f" and {self.sft_written} SFT conversations to {self.sft_output}"
        line += "; skipped: " + (", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "nothing")
        if self.notes:
            line += "; notes: " + ", ".join(f"{n} {why}" for why, n in self.notes.items())
        return line


# ------------------------------------------------------------------------------------------------- arguments
def parse_convert_args(argv: list[str]) -> ConvertConfig:
    """`convert <kind> --input ... --output ...` (as `rlhfkit data convert <kind> ...` passes it) or flags only."""
    if argv and not argv[0].startswith("-"):
        if argv[0] != "convert":
            raise ConfigError(f"unknown data command {argv[0]!r}; use `rlhfkit data convert <kind> --input FILE "
                              f"--output OUT.jsonl` with kind one of {', '.join(KINDS)}.")
        argv = argv[1:]
    if argv and not argv[0].startswith("-"):
        argv = ["--kind", argv[0], *argv[1:]]
    return parse_args(ConvertConfig, argv, prog="rlhfkit data convert")


parse_stage_args = parse_convert_args  # the hook rlhfkit's CLI looks for


def validate(cfg: ConvertConfig) -> None:
    """Raise ConfigError for a missing kind, input or output, or an option that does not apply to the kind."""
    if cfg.kind not in KINDS:
        close = difflib.get_close_matches(cfg.kind, KINDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        what = f"unknown data set kind {cfg.kind!r}" if cfg.kind else "name the data set"
        raise ConfigError(f"{what}{hint} Use `rlhfkit data convert <kind> --input FILE --output OUT.jsonl` with "
                          f"kind one of {', '.join(KINDS)}.")
    if not cfg.input:
        raise ConfigError(f"data convert {cfg.kind} needs --input: the data set file(s) to read.")
    if not cfg.output:
        raise ConfigError(f"data convert {cfg.kind} needs --output: the .jsonl file to write.")
    for out in [cfg.output] + ([cfg.sft_output] if cfg.sft_output else []):
        if Path(out).suffix.lower() not in (".jsonl", ".ndjson"):
            raise ConfigError(f"output {out} must be a JSON Lines file (.jsonl), the format rlhfkit's stages read.")
        if any(Path(out).resolve() == Path(p).resolve() for p in cfg.input):
            raise ConfigError(f"output {out} is also an input; write the converted rows to a new file.")
    defaults = ConvertConfig()
    for f in fields(ConvertConfig):
        kinds = _KIND_OPTIONS.get(f.name)
        if kinds and cfg.kind not in kinds and getattr(cfg, f.name) != getattr(defaults, f.name):
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(f"{flag} applies to data convert {' / '.join(kinds)}, not {cfg.kind}; drop it.")
    margin_kind = {"log_score_ratio": "shp", "score_gap": "helpsteer2"}.get(cfg.margin)
    if margin_kind and cfg.kind != margin_kind:
        raise ConfigError(f"--margin {cfg.margin} applies to data convert {margin_kind}; {cfg.kind} has no such "
                          "score (use --margin off or leave it at auto).")
    if cfg.kind == "helpsteer2" and not cfg.pairs:
        for name in ("attribute", "weights"):
            if getattr(cfg, name) != getattr(defaults, name):
                raise ConfigError(f"--{name} orders responses into pairs; add --pairs (or drop --{name}).")
        if cfg.margin == "score_gap":
            raise ConfigError("--margin score_gap needs --pairs (scored-response rows have no margin).")
    if cfg.min_score_ratio < 0 or not math.isfinite(cfg.min_score_ratio):
        raise ConfigError(f"--min-score-ratio must be 0 or more, got {cfg.min_score_ratio}.")
    if cfg.max_pairs_per_post < 0:
        raise ConfigError(f"--max-pairs-per-post must be 0 (no limit) or more, got {cfg.max_pairs_per_post}.")
    for name, value in cfg.weights.items():
        if name not in ATTRIBUTES:
            raise ConfigError(f"--weights names {name!r}, which is not a HelpSteer2 attribute; use "
                              f"{', '.join(ATTRIBUTES)}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"--weights: the weight of {name} must be a number, got {value!r}.")
    if cfg.weights and not any(cfg.weights.values()):
        raise ConfigError("--weights are all 0, so every pair would tie; give at least one attribute a weight.")
    for name in ("reddit_template", "article_template"):
        _template_fields(_template(cfg, name), name)


def _template(cfg: ConvertConfig, name: str) -> str:
    """The prompt template in use; a typed backslash-n is a newline (a shell passes "\\n" as two characters)."""
    given = getattr(cfg, name)
    if not given:
        return REDDIT_TEMPLATE if name == "reddit_template" else ARTICLE_TEMPLATE
    return given.replace("\\n", "\n").replace("\\t", "\t")


def _template_fields(template: str, name: str) -> list[str]:
    allowed = ("id", "post", "title", "subreddit", "site", "article")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"--{name.replace('_', '-')} is not a valid format string ({exc}).") from None
    for f in names:
        if f not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} names {{{f}}}; the fields of `info` are "
                              f"{', '.join('{' + a + '}' for a in allowed)}.")
    return names


# --------------------------------------------------------------------------------------------------- reading
class _Row:
    """One input row with typed accessors whose errors name file, row and field, and hint at the card's shape."""

    def __init__(self, path: str, lineno: int, row: dict[str, Any], shape: str):
        self.path, self.lineno, self.row, self.shape = path, lineno, row, shape

    def error(self, key: str | None, reason: str) -> DataError:
        return DataError(self.path, self.lineno, key, reason)

    def get(self, key: str, types: tuple[type, ...], what: str, optional: bool = False) -> Any:
        value = self.row.get(key)
        if value is None:
            if optional:
                return None
            raise self.error(key, f"missing; {self.shape} (this row has fields {sorted(self.row)}); check that "
                             "the kind matches the file")
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise self.error(key, f"must be {what}, got {type(value).__name__} {_short(value)}")
        return value

    def text(self, key: str) -> str:
        return self.get(key, (str,), "a string")

    def index(self, key: str) -> int:
        value = _as_int(self.row.get(key))
        if value not in (0, 1):
            if self.row.get(key) is None:
                return self.get(key, (int,), "0 or 1")
            raise self.error(key, f"must be 0 or 1, got {_short(self.row.get(key))}")
        return value

    def flag(self, key: str, optional: bool = False) -> bool | None:
        return self.get(key, (bool,), "true or false", optional)

    def rating(self, key: str, low: int, high: int) -> int:
        value = _as_int(self.row.get(key))
        if value is None or not low <= value <= high:
            if self.row.get(key) is None:
                return self.get(key, (int,), f"an integer {low}-{high}")
            raise self.error(key, f"must be an integer {low}-{high}, got {_short(self.row.get(key))}")
        return value


def _as_int(value: Any) -> int | None:
    """An integer, also one stored as a whole float (pandas turns nullable integer columns into floats)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _blank(text: str) -> bool:
    return not text.strip()


def read_inputs(paths: list[str], split: str = "train") -> list[tuple[str, int, dict[str, Any]]]:
    """(path, row number, row) for every row of every input, in order. `read_rows` also reads the layouts these
    data sets ship in: gzipped JSON Lines (HelpSteer2) and JSON Lines under a .json name (SHP)."""
    out = []
    for path in paths:
        out += [(path, lineno, row) for lineno, row in read_rows(path, split)]
    return out


def _write_jsonl(rows: list[dict[str, Any]], path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)  # a crash never leaves a half-written file under the real name


# ------------------------------------------------------------------------------------------------- shared bits
def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def _pair_row(cfg: ConvertConfig, prompt: str | list[Message], chosen: str, rejected: str,
              margin: float | None = None, **extra: Any) -> dict[str, Any]:
    """A TRL explicit-prompt pair, standard or (with --conversational) conversational."""
    if cfg.conversational:
        row: dict[str, Any] = {"prompt": _user(prompt) if isinstance(prompt, str) else prompt,
                               "chosen": _assistant(chosen), "rejected": _assistant(rejected)}
    else:
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if margin is not None:
        row["margin"] = margin
    row["source"] = SOURCES[cfg.kind]
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def _same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


# ------------------------------------------------------------------------------------------------------ oasst1
_OASST_SHAPE = ("an oasst1 row is one message: message_id, parent_id (null for a tree's first prompt), role "
                "(prompter or assistant), text, lang, rank, deleted, review_result")


@dataclass
class _Message:
    id: str
    parent: str | None
    role: str
    text: str
    lang: str | None
    rank: int | None
    deleted: bool
    review_result: bool | None
    path: str
    lineno: int
    order: int
    children: list[_Message] = field(default_factory=list)


def _oasst_message(r: _Row, order: int) -> _Message:
    message_id = r.text("message_id")
    parent = r.get("parent_id", (str,), "a message_id string or null", optional=True)
    role = r.text("role")
    if role not in ("prompter", "assistant"):
        raise r.error("role", f"must be 'prompter' or 'assistant' (oasst1's roles), got {_short(role)}")
    rank_value = r.row.get("rank")
    if isinstance(rank_value, float) and math.isnan(rank_value):
        rank_value = None  # pandas writes a missing rank as NaN
    rank = _as_int(rank_value)
    if rank_value is not None and (rank is None or rank < 0):
        raise r.error("rank", f"must be a non-negative integer (0 = best among siblings) or null, got "
                      f"{_short(rank_value)}")
    return _Message(id=message_id, parent=parent, role=role, text=r.text("text"),
                    lang=r.get("lang", (str,), "a language code string", optional=True), rank=rank,
                    deleted=bool(r.flag("deleted", optional=True)), review_result=r.flag("review_result", True),
                    path=r.path, lineno=r.lineno, order=order)


def _oasst_tree(rows: list[tuple[str, int, dict[str, Any]]], cfg: ConvertConfig, report: ConvertReport
                ) -> tuple[dict[str, _Message], list[_Message], set[str]]:
    """Parse and link the messages; return them by id, the roots, and the ids of the messages kept (not deleted,
    not failed review, not empty, in a wanted language, and with every ancestor kept). Every left-out message is
    counted once, under its own reason or as a reply below a left-out message."""
    by_id: dict[str, _Message] = {}
    for order, (path, lineno, row) in enumerate(rows):
        m = _oasst_message(_Row(path, lineno, row, _OASST_SHAPE), order)
        if m.id in by_id:
            first = by_id[m.id]
            raise DataError(path, lineno, "message_id", f"{m.id!r} repeats {first.path}, row {first.lineno}; "
                            "give each message once (don't pass the same split twice)")
        by_id[m.id] = m
    roots, orphans = [], []
    for m in by_id.values():
        if m.parent is None:
            if m.role != "prompter":
                raise DataError(m.path, m.lineno, "parent_id", "is null on an assistant message; every oasst1 "
                                "tree starts with a prompter message")
            roots.append(m)
            continue
        parent = by_id.get(m.parent)
        if parent is None:
            if not cfg.allow_orphans:
                raise DataError(m.path, m.lineno, "parent_id", f"names message {m.parent!r}, which is not in the "
                                "input; oasst1 keeps each tree within one split, so convert whole split files "
                                "(or pass --allow-orphans to skip such messages and their replies, counted)")
            orphans.append(m)
            continue
        if parent.role == m.role:
            raise DataError(m.path, m.lineno, "role", f"a {m.role} message replies to a {parent.role} message "
                            f"({parent.id}); oasst1 trees alternate prompter and assistant turns")
        parent.children.append(m)

    wanted = set(cfg.lang)
    kept: set[str] = set()
    visited: set[str] = set()
    stack = [(m, True, False) for m in reversed(roots)] + [(m, False, True) for m in reversed(orphans)]
    while stack:
        m, parent_kept, orphan = stack.pop()
        visited.add(m.id)
        reason = None
        if orphan:
            reason = "orphaned messages (parent not in the input)"
        elif not parent_kept:
            reason = "messages below a skipped message"
        elif m.deleted:
            reason = "deleted messages"
        elif m.review_result is False:
            reason = "messages that failed review"
        elif _blank(m.text):
            reason = "empty messages"
        elif wanted and m.lang not in wanted:
            reason = f"messages not in --lang {','.join(cfg.lang)}"
        if reason:
            report.skipped[reason] += 1
        else:
            kept.add(m.id)
        stack += [(c, reason is None, False) for c in reversed(m.children)]
    if len(visited) != len(by_id):  # what no first prompt (or orphan) leads to hangs in a parent_id cycle
        stuck = min((m for m in by_id.values() if m.id not in visited), key=lambda m: m.order)
        raise DataError(stuck.path, stuck.lineno, "parent_id", "leads into a cycle of parent_id links instead of "
                        "back to a first prompt (parent_id null); fix the links")
    return by_id, roots, kept


def _conversation(m: _Message, by_id: dict[str, _Message]) -> list[Message]:
    """The messages from the tree's first prompt down to m; prompter becomes the user role."""
    path = []
    while True:
        path.append({"role": "user" if m.role == "prompter" else "assistant", "content": m.text})
        if m.parent is None:
            return path[::-1]
        m = by_id[m.parent]


def _best(children: list[_Message]) -> _Message:
    """The best-ranked reply; unranked replies come after ranked ones, ties go to the first in the input."""
    return min(children, key=lambda c: (c.rank is None, c.rank or 0, c.order))


def convert_oasst1(rows: list[tuple[str, int, dict[str, Any]]], cfg: ConvertConfig, report: ConvertReport
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """K-way rankings: each kept prompter message whose kept assistant replies include >= 2 ranked ones gives
    {"prompt": the conversation through that prompter turn, "responses": the ranked replies, "ranking": by
    `rank`, 0 = best (equal ranks are one tier)}. Unranked replies are left out of the ranking and counted.
    Also returns the SFT threads of `sft_output` (empty when not asked)."""
    report.unit = "rankings"
    by_id, roots, kept = _oasst_tree(rows, cfg, report)
    out = []
    for m in sorted((by_id[i] for i in kept if by_id[i].role == "prompter"), key=lambda m: m.order):
        replies = [c for c in m.children if c.id in kept]
        if not replies:
            continue  # a prompt nobody answered (yet): nothing to rank
        ranked = sorted((c for c in replies if c.rank is not None), key=lambda c: c.order)
        report.notes["unranked replies left out of rankings"] += len(replies) - len(ranked)
        if len(ranked) < 2:
            report.skipped["prompter turns with fewer than 2 ranked replies"] += 1
            continue
        ranks = sorted({c.rank for c in ranked})
        tiers = [[i for i, c in enumerate(ranked) if c.rank == r] for r in ranks]
        if len(tiers) < 2:
            report.skipped["prompter turns whose replies all share one rank"] += 1
            continue
        tier_of = {i: t for t, tier in enumerate(tiers) for i in tier}
        if any(tier_of[i] != tier_of[j] and _same(ranked[i].text, ranked[j].text)
               for i in range(len(ranked)) for j in range(i + 1, len(ranked))):
            report.skipped["prompter turns with identical replies ranked differently"] += 1
            continue
        out.append({"prompt": _conversation(m, by_id), "responses": [_assistant(c.text) for c in ranked],
                    "ranking": [t[0] if len(t) == 1 else t for t in tiers], "source": SOURCES["oasst1"],
                    "prompt_id": m.id})
    sft = []
    if cfg.sft_output:
        for root in sorted((r for r in roots if r.id in kept), key=lambda m: m.order):
            thread, node = [root], root
            while True:
                replies = [c for c in node.children if c.id in kept]
                if not replies:
                    break
                node = _best(replies)
                thread.append(node)
            while thread and thread[-1].role == "prompter":
                thread.pop()
            if not thread:
                report.skipped["trees without a kept assistant reply (SFT)"] += 1
                continue
            sft.append({"messages": _conversation(thread[-1], by_id), "source": SOURCES["oasst1"],
                        "tree_id": root.id})
    return out, sft


# --------------------------------------------------------------------------------------------------------- SHP
_SHP_SHAPE = ("an SHP row has post_id, history, human_ref_A, human_ref_B, labels (1 = A preferred) and "
              "score_ratio")


def convert_shp(rows: list[tuple[str, int, dict[str, Any]]], cfg: ConvertConfig, report: ConvertReport
                ) -> list[dict[str, Any]]:
    """Pairs {"prompt": history, "chosen", "rejected"}: labels 1 means human_ref_A is preferred, 0 means B.

    --margin log_score_ratio writes margin = log(score_ratio). The margin m of the reward loss
    -log sigma(r_chosen - r_rejected - m) (Llama 2 section 3.2.2) is in reward units, a log-odds under
    Bradley-Terry, and SHP states preference strength as a ratio of scores, so its log is the additive
    counterpart: 2x -> 0.69, 10x -> 2.30, where the raw ratio (into the hundreds) would swamp the reward gap."""
    need_ratio = cfg.margin == "log_score_ratio" or cfg.min_score_ratio > 0 or cfg.max_pairs_per_post > 0
    kept: list[tuple[float, str | None, dict[str, Any]]] = []
    for path, lineno, row in rows:
        r = _Row(path, lineno, row, _SHP_SHAPE)
        history, a, b = r.text("history"), r.text("human_ref_A"), r.text("human_ref_B")
        label = r.index("labels")
        ratio = None
        if need_ratio:
            ratio = float(r.get("score_ratio", (int, float), "a number"))
            if not math.isfinite(ratio) or ratio < 1:
                raise r.error("score_ratio", f"must be a finite number >= 1 (the preferred comment's score over "
                              f"the other's, as the SHP card defines it), got {ratio}")
        post_id = r.text("post_id") if cfg.max_pairs_per_post else None
        chosen, rejected = (a, b) if label == 1 else (b, a)
        if _blank(history) or _blank(chosen) or _blank(rejected):
            report.skipped["rows with empty text"] += 1
            continue
        if _same(chosen, rejected):
            report.skipped["identical responses"] += 1
            continue
        if ratio is not None and ratio < cfg.min_score_ratio:
            report.skipped[f"below --min-score-ratio {cfg.min_score_ratio:g}"] += 1
            continue
        margin = math.log(ratio) if cfg.margin == "log_score_ratio" else None
        kept.append((ratio or 0.0, post_id, _pair_row(cfg, history, chosen, rejected, margin)))
    if cfg.max_pairs_per_post:
        per_post: dict[str | None, list[int]] = defaultdict(list)
        for i, (ratio, post_id, _) in enumerate(kept):
            per_post[post_id].append(i)
        chosen_ids: set[int] = set()
        for ids in per_post.values():  # the strongest preferences of each post; ties keep file order
            chosen_ids.update(sorted(ids, key=lambda i: -kept[i][0])[: cfg.max_pairs_per_post])
        dropped = len(kept) - len(chosen_ids)
        if dropped:
            report.skipped[f"beyond --max-pairs-per-post {cfg.max_pairs_per_post}"] += dropped
        kept = [k for i, k in enumerate(kept) if i in chosen_ids]
    return [row for _, _, row in kept]


# --------------------------------------------------------------------------------------- summarize_from_feedback
_SUMMARIZE_SHAPE = ("a summarize_from_feedback comparison has info {id, post, title, subreddit, site, article}, "
                    "summaries [{text, policy, note}, {text, policy, note}], choice (0 or 1), worker, extra "
                    "{confidence}")


def _summarize_prompt(r: _Row, info: dict[str, Any], cfg: ConvertConfig) -> str:
    post, article = info.get("post"), info.get("article")
    if isinstance(post, str) and not _blank(post):
        name = "reddit_template"
    elif isinstance(article, str) and not _blank(article):
        name = "article_template"
    else:
        raise r.error("info.post", "is missing or empty and so is info.article; a comparison needs the Reddit post "
                      "(TL;DR) or the news article (CNN/DM) that was summarised")
    template = _template(cfg, name)
    values = {}
    for key in _template_fields(template, name):
        value = info.get(key)
        if not isinstance(value, str):
            raise r.error(f"info.{key}", f"must be a string (the prompt template uses {{{key}}}), got "
                          f"{_short(value)}")
        values[key] = value
    return template.format(**values)


def convert_summarize(rows: list[tuple[str, int, dict[str, Any]]], cfg: ConvertConfig, report: ConvertReport
                      ) -> list[dict[str, Any]]:
    """Pairs: prompt from `info` through --reddit-template (TL;DR posts) or --article-template (CNN/DM), chosen =
    summaries[choice].text, rejected = the other; worker -> annotator; chosen_policy / rejected_policy and
    extra.confidence (as worker_confidence) are kept as extra columns. The worker's confidence is not turned into
    a margin (the card does not define its scale, and a margin needs one), nor written as `confidence`, which the
    trainers read as the probability that chosen is truly better."""
    out = []
    for path, lineno, row in rows:
        r = _Row(path, lineno, row, _SUMMARIZE_SHAPE)
        info = r.get("info", (dict,), "an object {id, post, title, subreddit, site, article}")
        summaries = r.get("summaries", (list,), "a list of two {text, policy, note} objects")
        if len(summaries) != 2:
            raise r.error("summaries", f"has {len(summaries)} entries; a comparison has exactly 2")
        texts, policies = [], []
        for i, s in enumerate(summaries):
            if not isinstance(s, dict) or not isinstance(s.get("text"), str):
                raise r.error(f"summaries[{i}].text", "missing or not a string; each summary is {text, policy, "
                              "note}")
            texts.append(s["text"])
            policies.append(s.get("policy") if isinstance(s.get("policy"), str) else None)
        choice = r.index("choice")
        worker = r.get("worker", (str,), "a string", optional=True)
        extra = r.get("extra", (dict,), "an object {confidence}", optional=True) or {}
        confidence = extra.get("confidence")
        if confidence is not None and _as_int(confidence) is None:
            raise r.error("extra.confidence", f"must be an integer or null, got {_short(confidence)}")
        prompt = _summarize_prompt(r, info, cfg)
        chosen, rejected = texts[choice], texts[1 - choice]
        if _blank(chosen) or _blank(rejected):
            report.skipped["rows with an empty summary"] += 1
            continue
        if _same(chosen, rejected):
            report.skipped["identical summaries"] += 1
            continue
        out.append(_pair_row(cfg, prompt, chosen, rejected, annotator=worker or None,
                             chosen_policy=policies[choice], rejected_policy=policies[1 - choice],
                             worker_confidence=_as_int(confidence)))
    return out


# ------------------------------------------------------------------------------------------------ PKU-SafeRLHF
_PKU_SHAPE = ("a PKU-SafeRLHF row has prompt, response_0, response_1, is_response_0_safe, is_response_1_safe, "
              "better_response_id and safer_response_id")


def convert_pku_saferlhf(rows: list[tuple[str, int, dict[str, Any]]], cfg: ConvertConfig, report: ConvertReport
                         ) -> list[dict[str, Any]]:
    """Pairs picked by better_response_id (--by better) or safer_response_id (--by safer). The safety labels of
    the two responses ride along as chosen_safe / rejected_safe (and the severity levels, where the row has them)
    for cost models and safety filters."""
    key = f"{cfg.by}_response_id"
    out = []
    for path, lineno, row in rows:
        r = _Row(path, lineno, row, _PKU_SHAPE)
        prompt = r.text("prompt")
        responses = [r.text("response_0"), r.text("response_1")]
        safe = [r.flag("is_response_0_safe"), r.flag("is_response_1_safe")]
        severity = [_as_int(row.get(f"response_{i}_severity_level")) for i in (0, 1)]
        c = r.index(key)
        r.index("better_response_id" if cfg.by == "safer" else "safer_response_id")  # the whole row fits the card
        if _blank(prompt) or _blank(responses[0]) or _blank(responses[1]):
            report.skipped["rows with empty text"] += 1
            continue
        if _same(*responses):
            report.skipped["identical responses"] += 1
            continue
        out.append(_pair_row(cfg, prompt, responses[c], responses[1 - c], chosen_safe=safe[c],
                             rejected_safe=safe[1 - c], chosen_severity_level=severity[c],
                             rejected_severity_level=severity[1 - c]))
    return out


# -------------------------------------------------------------------------------------------------- HelpSteer2
_HELPSTEER_SHAPE = ("a HelpSteer2 row has prompt, response and the attributes helpfulness, correctness, coherence, "
                    "complexity, verbosity (integers 0-4)")
# HelpSteer2 card: a multi-turn prompt holds every earlier turn, "{user turn 1}\n<extra_id_1>Assistant\n{assistant
# turn 1}\n<extra_id_1>User\n{user turn 2}"; the response is the last assistant turn.
_NEMO_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def _nemo_messages(r: _Row, prompt: str) -> list[Message]:
    parts = _NEMO_TURN.split(prompt)  # [user 1, "Assistant", assistant 1, "User", user 2, ...]
    messages = [{"role": "user", "content": parts[0].strip()}]
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "User" else "assistant"
        if role == messages[-1]["role"]:
            raise r.error("prompt", f"turn {len(messages) + 1} is a second {role} turn in a row; a multi-turn "
                          "HelpSteer2 prompt alternates user and <extra_id_1>Assistant turns")
        messages.append({"role": role, "content": content.strip()})
    if messages[-1]["role"] != "user":
        raise r.error("prompt", "ends with an assistant turn; a HelpSteer2 prompt ends with the user turn the "
                      "response answers")
    for i, m in enumerate(messages):
        if _blank(m["content"]):
            raise r.error("prompt", f"turn {i + 1} ({m['role']}) is empty")
    return messages


def convert_helpsteer2(rows: list[tuple[str, int, dict[str, Any]]], cfg: ConvertConfig, report: ConvertReport
                       ) -> list[dict[str, Any]]:
    """Scored responses {"prompt", "response", "scores": {attribute: 0-4}}, or with --pairs, pairs between the
    responses to the same prompt ordered by --attribute or the --weights sum, margin = the score gap."""
    parsed = []
    for path, lineno, row in rows:
        r = _Row(path, lineno, row, _HELPSTEER_SHAPE)
        prompt, response = r.text("prompt"), r.text("response")
        scores = {a: r.rating(a, 0, 4) for a in ATTRIBUTES}
        if _blank(prompt) or _blank(response):
            report.skipped["rows with empty text"] += 1
            continue
        if "<extra_id_1>" in prompt:
            if cfg.conversational:
                report.notes["multi-turn prompts split into messages"] += 1
            else:
                report.notes["multi-turn prompts kept in NeMo <extra_id_1> text (--conversational splits them)"] += 1
        shown = (_nemo_messages(r, prompt) if "<extra_id_1>" in prompt else _user(prompt.strip())) \
            if cfg.conversational else prompt
        parsed.append((prompt, shown, response, scores))
    if not cfg.pairs:
        report.unit = "scored responses"
        return [{"prompt": shown, "response": _assistant(response) if cfg.conversational else response,
                 "scores": scores, "source": SOURCES["helpsteer2"]} for _, shown, response, scores in parsed]

    def score(s: dict[str, int]) -> float:
        if cfg.weights:
            return sum(w * s[a] for a, w in cfg.weights.items())
        return float(s[cfg.attribute])

    groups: dict[str, list[int]] = defaultdict(list)  # the card: consecutive rows share a prompt
    for i, (prompt, *_rest) in enumerate(parsed):
        groups[prompt].append(i)
    out = []
    for ids in groups.values():
        if len(ids) < 2:
            report.skipped["prompts with a single response"] += 1
            continue
        for x in range(len(ids)):
            for y in range(x + 1, len(ids)):
                (_, shown, resp_a, s_a), (_, _, resp_b, s_b) = parsed[ids[x]], parsed[ids[y]]
                gap = score(s_a) - score(s_b)
                if abs(gap) < 1e-9:
                    report.skipped["ties"] += 1
                    continue
                if _same(resp_a, resp_b):
                    report.skipped["identical responses"] += 1
                    continue
                chosen, rejected = (resp_a, resp_b) if gap > 0 else (resp_b, resp_a)
                margin = round(abs(gap), 6) if cfg.margin in ("auto", "score_gap") else None
                out.append(_pair_row(cfg, shown, chosen, rejected, margin))
    return out


# --------------------------------------------------------------------------------------------------------- main
def convert(cfg: ConvertConfig) -> ConvertReport:
    """Read, convert and write; return what happened. Raises UserError when nothing is left to write."""
    validate(cfg)
    rows = read_inputs(cfg.input, cfg.split)
    report = ConvertReport(kind=cfg.kind, output=cfg.output, rows_read=len(rows))
    sft: list[dict[str, Any]] = []
    if cfg.kind == "oasst1":
        out, sft = convert_oasst1(rows, cfg, report)
    else:
        out = {"shp": convert_shp, "summarize": convert_summarize, "pku-saferlhf": convert_pku_saferlhf,
               "helpsteer2": convert_helpsteer2}[cfg.kind](rows, cfg, report)
    if not out:
        raise UserError(f"nothing to write: no {report.unit} came out of {len(rows)} rows ({report.summary()}); "
                        "check --kind and the filters.")
    _write_jsonl(out, cfg.output)
    report.written = len(out)
    if cfg.sft_output:
        _write_jsonl(sft, cfg.sft_output)
        report.sft_output, report.sft_written = cfg.sft_output, len(sft)
    return report


def main(cfg: ConvertConfig) -> ConvertReport:
    report = convert(cfg)
    print(report.summary())
    return report
