"""`rlhfkit cai`: Constitutional AI (Bai et al. 2022, arXiv 2212.08073) with any judge.

    rlhfkit cai revise --model POLICY --prompts P --output-dir D [--rounds N]    supervised stage (SL-CAI)
    rlhfkit cai label  --model POLICY --prompts P --output-dir D [--store DB]    AI preference labels (RLAIF)

revise: sample a response per prompt, then N rounds of critique -> revision, each under a principle drawn from
the constitution; writes the final revisions as SFT rows (D/sft.jsonl) and every chain (D/chains.jsonl).
label: two responses per prompt (sampled, or from --responses), compared under a drawn principle in both orders;
P(A better) is the mean of P(A first wins) and 1 - P(B first wins), which cancels a judge's position bias. Writes
TRL preference rows (D/preferences.jsonl) with `preference_prob`, a margin, `source: ai`, and optionally stores the
judgments in the feedback database beside human ones."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from rlhfkit.config import parse_args
from rlhfkit.data.encoding import single_turn_text
from rlhfkit.errors import ConfigError, DataError, UserError
from rlhfkit.feedback.constitution import Constitution
from rlhfkit.feedback.judges import JudgeConfig
from rlhfkit.feedback.protocols import Comparison, Judge

log = logging.getLogger(__name__)

COMMANDS = ("revise", "label")


@dataclass
class CAIConfig:
    """Constitutional AI: critique -> revision SFT data, and AI preference labels (RLAIF)."""

    command: Literal["revise", "label"] = "label"
    """What to do (the word after `rlhfkit cai`): revise (SL-CAI data) or label (AI preference pairs)."""
    model: str = ""
    """The policy whose samples are critiqued (revise) or compared (label), a Hugging Face model directory."""
    prompts: str = ""
    """Prompts file: rows with "prompt" or "text" (a playground prompts file works)."""
    responses: str = ""
    """label: compare these instead of sampling: rows {"prompt", "responses": [a, b, ...]} (every pair of a row)."""
    output_dir: str = ""
    """Where sft.jsonl + chains.jsonl (revise) or preferences.jsonl + judgments.jsonl (label) and summary.json go."""
    constitution: str = ""
    """Constitution YAML file (empty: the package default, rlhfkit/feedback/constitutions/default.yaml)."""
    principle: str = ""
    """Use only this principle id (empty: draw one per critique or comparison, in proportion to the weights)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The feedback model."""
    rounds: int = 1
    """revise: critique -> revision rounds per response (a new principle each round)."""
    samples_per_prompt: int = 2
    """label: responses sampled per prompt; every pair of distinct ones is compared."""
    max_prompts: int = 0
    """Use only the first N prompts (0: all)."""
    max_new_tokens: int = 48
    """Longest sampled policy response."""
    temperature: float = 1.0
    """Policy sampling temperature."""
    seed: int = 0
    """Seed for sampling and for drawing principles."""
    min_confidence: float = 0.0
    """label: a pair whose |P(A better) - 0.5| is below this is a tie and gives no training row."""
    max_margin: float = 3.0
    """label: each row's margin is the judge's log-odds |log(p / (1 - p))|, capped here (Llama 2's largest
    margin is 3); 0 writes no margin."""
    conversational: bool = True
    """Prompts are user turns of a chat: the policy is sampled through its chat template and rows are written as
    chat messages; without it prompts are plain text, sampled and written as strings."""
    store: str = ""
    """label: also store the AI judgments in this feedback database (SQLite path or SQLAlchemy URL)."""
    project: str = "ai-feedback"
    """label --store: the pairwise project; created from the labelled pairs if missing, otherwise the AI judge
    takes its open items like any annotator."""
    store_user: str = "ai-judge"
    """label --store: the user name the AI judgments are stored under."""
    overwrite: bool = False
    """Replace outputs already in output_dir."""

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("--output-dir is required: the directory the AI feedback is written to.")
        if not self.prompts and not (self.command == "label" and self.responses):
            raise ConfigError(f"cai {self.command} needs --prompts (a prompts file)"
                              + (" or --responses (pairs to compare)." if self.command == "label" else "."))
        if not self.model and not (self.command == "label" and self.responses):
            raise ConfigError(f"cai {self.command} needs --model, the policy to sample responses from"
                              + (" (or --responses with responses to compare)." if self.command == "label" else "."))
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}.")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be at least 2 (pairs are compared), got {self.samples_per_prompt}.")
        if not 0.0 <= self.min_confidence < 0.5:
            raise ConfigError(f"min_confidence must be in [0, 0.5), got {self.min_confidence}.")
        if self.max_margin < 0 or self.max_prompts < 0:
            raise ConfigError("max_margin and max_prompts must be 0 or more.")
        self.judge.validate()


def parse_cai_args(argv: list[str]) -> CAIConfig:
    """`label --model x ...` (the command first, as `rlhfkit cai label ...` passes it) or `--command label`."""
    if argv and not argv[0].startswith("-"):
        if argv[0] not in COMMANDS:
            raise ConfigError(f"unknown cai command {argv[0]!r}; use one of {', '.join(COMMANDS)}.")
        argv = ["--command", argv[0], *argv[1:]]
    return parse_args(CAIConfig, argv, prog="rlhfkit cai")




# ------------------------------------------------------------------------------------------ critique/revise
def critique_revision_chains(judge: Judge, constitution: Constitution, prompts: Sequence[str],
                             responses: Sequence[str], rounds: int, rng: random.Random,
                             principle: str = "") -> list[dict[str, Any]]:
    """SL-CAI (Bai et al. 2022, section 3.1): each response critiqued and revised `rounds` times, a principle
    drawn per round; every round of one pass goes to the judge as one batch. Returns one chain per prompt:
    {"prompt", "initial", "final", "steps": [{"principle", "critique", "revision"}, ...]}."""
    current = list(responses)
    chains = [{"prompt": p, "initial": r, "steps": []} for p, r in zip(prompts, responses)]
    for _ in range(rounds):
        drawn = [constitution.principle(principle) if principle else constitution.sample(rng) for _ in prompts]
        critiques = judge.critique(prompts, current, drawn)
        revisions = judge.revise(prompts, current, drawn, critiques)
        for chain, pr, crit, rev in zip(chains, drawn, critiques, revisions):
            chain["steps"].append({"principle": pr.id, "critique": crit, "revision": rev})
        current = list(revisions)
    for chain, final in zip(chains, current):
        chain["final"] = final
    return chains


# ------------------------------------------------------------------------------------------- AI preferences
@dataclass(frozen=True)
class AILabel:
    """One pair judged in both orders."""

    prompt: str
    a: str
    b: str
    principle: str
    prob_a: float | None
    """P(a better), position-debiased: (P(a wins shown first) + 1 - P(b wins shown first)) / 2; None when the
    judge abstained in both orders."""
    prob_a_first: float | None
    prob_b_first: float | None
    position_bias: float | None
    """(P(a wins | a first) - P(a wins | b first)) / 2: how much showing a response first helps it."""
    methods: tuple[str, str]


def debias(p_first_order: float | None, p_second_order: float | None) -> tuple[float | None, float | None]:
    """P(a better) and the position bias from P(a first wins) and P(b first wins). One missing order leaves the
    other (biased) answer alone; both missing gives (None, None)."""
    if p_first_order is None and p_second_order is None:
        return None, None
    if p_second_order is None:
        return p_first_order, None
    if p_first_order is None:
        return 1.0 - p_second_order, None
    a_when_second = 1.0 - p_second_order
    return (p_first_order + a_when_second) / 2, (p_first_order - a_when_second) / 2


def ai_preferences(judge: Judge, constitution: Constitution, pairs: Sequence[tuple[str, str, str]],
                   rng: random.Random, principle: str = "") -> list[AILabel]:
    """Judge each (prompt, a, b) under a drawn principle, in both orders, in one batch."""
    drawn = [constitution.principle(principle) if principle else constitution.sample(rng) for _ in pairs]
    asks = [Comparison(p, a, b, pr) for (p, a, b), pr in zip(pairs, drawn)]
    asks += [Comparison(p, b, a, pr) for (p, a, b), pr in zip(pairs, drawn)]
    verdicts = judge.compare(asks)
    n = len(pairs)
    out = []
    for i, ((p, a, b), pr) in enumerate(zip(pairs, drawn)):
        v1, v2 = verdicts[i], verdicts[n + i]
        prob, bias = debias(v1.prob_first, v2.prob_first)
        out.append(AILabel(p, a, b, pr.id, prob, v1.prob_first, v2.prob_first, bias, (v1.method, v2.method)))
    return out


def margin_from_prob(p: float, cap: float) -> float:
    """|log-odds| of the judge's preference, capped: the Bradley-Terry reward gap that would produce p."""
    p = min(max(p, 1e-6), 1 - 1e-6)
    return min(cap, abs(math.log(p / (1 - p))))


def label_rows(labels: Sequence[AILabel], judge_name: str, min_confidence: float = 0.0, max_margin: float = 3.0,
               conversational: bool = True) -> tuple[list[dict[str, Any]], Counter]:
    """TRL explicit-prompt rows (chosen = the judge's favourite) with preference_prob (soft label, >= 0.5),
    margin, principle, annotator and source "ai"; ties and abstentions give no row (counted)."""
    rows: list[dict[str, Any]] = []
    report: Counter = Counter()
    for lab in labels:
        if lab.prob_a is None:
            report["abstained"] += 1
            continue
        if abs(lab.prob_a - 0.5) < min_confidence or lab.prob_a == 0.5:
            report["ties"] += 1
            continue
        a_wins = lab.prob_a > 0.5
        chosen, rejected = (lab.a, lab.b) if a_wins else (lab.b, lab.a)
        prob = lab.prob_a if a_wins else 1 - lab.prob_a
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": lab.prompt}] if conversational else lab.prompt,
            "chosen": [{"role": "assistant", "content": chosen}] if conversational else chosen,
            "rejected": [{"role": "assistant", "content": rejected}] if conversational else rejected,
            "preference_prob": round(prob, 6),
            "principle": lab.principle,
            "annotator": f"ai:{judge_name}"[:64],
            "source": "ai",
        }
        if max_margin > 0:
            row["margin"] = round(margin_from_prob(prob, max_margin), 6)
        rows.append(row)
        report["rows"] += 1
    return rows, report


def strength_from_prob(p: float) -> str:
    """The Llama 2 strength level of a judge's P(A better) = p, from its distance to a coin flip |p - 0.5|:
    >= 0.4 (the judge >= 90% sure either way) significantly better, >= 0.25 (>= 75%) better, >= 0.1 (>= 60%)
    slightly better, else negligible."""
    conf = abs(p - 0.5)
    return ("significantly_better" if conf >= 0.4 else "better" if conf >= 0.25
            else "slightly_better" if conf >= 0.1 else "negligible")


# ------------------------------------------------------------------------------------- the feedback store
@dataclass
class AIAnnotator:
    """An AI judge acting as one annotator of a feedback project: who it judges as, under which principle (empty:
    one drawn per comparison), and below which confidence |P(A better) - 0.5| it answers a tie."""

    judge: Judge
    constitution: Constitution
    user: str = "ai-judge"
    principle: str = ""
    min_confidence: float = 0.0


def label_store_project(svc: Any, project_name: str, annotator: AIAnnotator, rng: random.Random,
                        pairs: Sequence[tuple[str, str, str]] = (), sources: tuple[str, str] = ("a", "b"),
                        known: Sequence[AILabel] = (), limit: int | None = None) -> dict[str, Any]:
    """The AI judge labels a pairwise project through the service layer, like a person: it takes tasks from the
    queue, judges each in both orders, and submits A/B (with strength and its probability in the rationale) or a
    tie. With `pairs`, a missing project is created from them (2 annotators per item, so people can judge the same
    items and agreement with the AI can be measured). `known` labels (already judged, e.g. by `cai label`) are
    reused for items with the same prompt and responses instead of asking the judge again. limit: stop after
    that many judgments (a rounds loop labels up to its budget, reordering the queue in between)."""
    from rlhfkit.feedback.service import Conflict, ItemSpec

    try:
        project = svc.project(project_name)
    except UserError:
        if not pairs:
            raise UserError(f"feedback project {project_name!r} does not exist and there are no pairs to create it "
                            "from; create it with `rlhfkit label create` or label sampled pairs.") from None
        try:
            project = svc.create_project(project_name, "pairwise", "Compare the two responses.", 2, 2)
        except Conflict:
            project = svc.project(project_name)
        svc.add_items(project.id, [ItemSpec(p, [a, b], list(sources)) for p, a, b in pairs])
    if project.mode != "pairwise":
        raise UserError(f"feedback project {project_name!r} ranks {project.responses_per_item} responses; the AI judge "
                        "labels pairwise projects only.")
    judge, user = annotator.judge, annotator.user
    uid = svc.ensure_user(user).id
    stored = Counter()
    done = {(lab.prompt, lab.a, lab.b): lab for lab in known}
    while (limit is None or sum(stored.values()) < limit) and (task := svc.next_task(uid, project.id)) is not None:
        key = (task.prompt, task.responses[0], task.responses[1])
        lab = done.get(key) or ai_preferences(judge, annotator.constitution, [key], rng, annotator.principle)[0]
        if lab.prob_a is None or abs(lab.prob_a - 0.5) < annotator.min_confidence or lab.prob_a == 0.5:
            outcome, strength = "tie", None
        else:
            outcome = "A" if lab.prob_a > 0.5 else "B"
            strength = strength_from_prob(lab.prob_a)
        rationale = (f"AI judge {judge.name}, principle {lab.principle}: P(A better) = "
                     + ("n/a" if lab.prob_a is None else f"{lab.prob_a:.3f}"))
        ack = svc.submit(uid, task.assignment_id, f"ai-{project.id:04d}-{task.assignment_id:08d}", outcome=outcome,
                         strength=strength, rationale=rationale[:500])
        stored[outcome] += not ack.duplicate
    return {"project": project.name, "user": user, "stored": dict(stored)}


# ------------------------------------------------------------------------------------------------- the stage
def _prompt_texts(path: str, limit: int) -> list[str]:
    from rlhfkit.data.readers import read_prompts

    out = []
    for i, p in enumerate(read_prompts(path)):
        text = single_turn_text(p)
        if text is None:
            raise DataError(path, i + 1, "prompt", "must be a string or a single user turn for AI feedback (the "
                            "judge and the revision chain work on the user's text)")
        out.append(text)
    return out[:limit] if limit else out


def _sample(cfg: CAIConfig, prompts: list[str], k: int) -> list[list[str]]:
    import torch

    from rlhfkit.data.encoding import user_turn
    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.generation import sample

    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # conversational: the policy answers each prompt as a user turn, as the rows written below say it did
        asked = [user_turn(p) if cfg.conversational else p for p in prompts for _ in range(k)]
        texts = sample(model, tokenizer, asked, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature).texts
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def _file_pairs(path: str, limit: int) -> list[tuple[str, str, str]]:
    from rlhfkit.data.readers import read_rows

    pairs = []
    rows = read_rows(path)
    for lineno, row in rows[:limit] if limit else rows:
        prompt, responses = row.get("prompt"), row.get("responses")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(path, lineno, "prompt", "missing or not a string")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise DataError(path, lineno, "responses", "must be a list of at least two response strings")
        pairs += _pairs_of(prompt, responses)
    return pairs


def _pairs_of(prompt: str, responses: Sequence[str]) -> list[tuple[str, str, str]]:
    unique = list(dict.fromkeys(r.strip() for r in responses if r.strip()))
    return [(prompt, unique[i], unique[j]) for i in range(len(unique)) for j in range(i + 1, len(unique))]


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def revise(cfg: CAIConfig, judge: Judge, constitution: Constitution, out: Path) -> dict[str, Any]:
    prompts = _prompt_texts(cfg.prompts, cfg.max_prompts)
    initial = [s[0] for s in _sample(cfg, prompts, 1)]
    chains = critique_revision_chains(judge, constitution, prompts, initial, cfg.rounds, random.Random(cfg.seed),
                                      cfg.principle)
    rows = [{"prompt": [{"role": "user", "content": c["prompt"]}],
             "completion": [{"role": "assistant", "content": c["final"]}]} if cfg.conversational
            else {"prompt": c["prompt"], "completion": c["final"]} for c in chains if c["final"].strip()]
    _write_jsonl(out / "sft.jsonl", rows)
    _write_jsonl(out / "chains.jsonl", chains)
    changed = Counter(s["principle"] for c in chains for s, before in
                      zip(c["steps"], [c["initial"]] + [s["revision"] for s in c["steps"]]) if s["revision"] != before)
    summary = {"command": "revise", "prompts": len(prompts), "rows": len(rows), "rounds": cfg.rounds,
               "revised_responses": sum(c["final"] != c["initial"] for c in chains),
               "revisions_by_principle": dict(changed), "judge": judge.name}
    return summary


def label(cfg: CAIConfig, judge: Judge, constitution: Constitution, out: Path) -> dict[str, Any]:
    if cfg.responses:
        pairs = _file_pairs(cfg.responses, cfg.max_prompts)
    else:
        prompts = _prompt_texts(cfg.prompts, cfg.max_prompts)
        pairs = [pair for p, s in zip(prompts, _sample(cfg, prompts, cfg.samples_per_prompt)) for pair in _pairs_of(p, s)]
    if not pairs:
        raise UserError("no prompt has two distinct responses to compare; sample more (--samples-per-prompt) or at a "
                        "higher --temperature.")
    rng = random.Random(cfg.seed)
    labels = ai_preferences(judge, constitution, pairs, rng, cfg.principle)
    rows, report = label_rows(labels, judge.name, cfg.min_confidence, cfg.max_margin, cfg.conversational)
    _write_jsonl(out / "preferences.jsonl", rows)
    _write_jsonl(out / "judgments.jsonl", [lab.__dict__ | {"methods": list(lab.methods)} for lab in labels])
    biases = [lab.position_bias for lab in labels if lab.position_bias is not None]
    summary: dict[str, Any] = {
        "command": "label", "pairs": len(pairs), "rows": report["rows"], "ties": report["ties"],
        "abstained": report["abstained"], "judge": judge.name,
        "methods": dict(Counter(m for lab in labels for m in lab.methods)),
        "mean_position_bias": sum(biases) / len(biases) if biases else None,
        "principles": dict(Counter(lab.principle for lab in labels)),
    }
    if cfg.store:
        from rlhfkit.feedback.service import FeedbackService
        from rlhfkit.feedback.store import open_store

        svc = FeedbackService(open_store(cfg.store), rng=random.Random(cfg.seed + 1))
        source = Path(cfg.model).name if cfg.model else Path(cfg.responses).stem
        annotator = AIAnnotator(judge, constitution, cfg.store_user, cfg.principle, cfg.min_confidence)
        summary["store"] = label_store_project(svc, cfg.project, annotator, random.Random(cfg.seed + 2), pairs,
                                               (source, source), known=labels)
    return summary
