"""The labelling commands that need only the feedback store: create projects, manage users, export judgments,
report annotator reliability.
`rlhfkit label` (rlhfkit/label.py, where its usage is listed) adds `serve` (the web app) and `simulate` (the
playground's annotators).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import parse_args
from rlhfkit.data.readers import read_prompts, read_rows
from rlhfkit.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

COMMANDS = ("create", "add-user", "serve", "export", "simulate", "users", "reset-password", "deactivate", "reactivate",
            "unlock", "revoke-sessions", "reliability")
MIN_BODY_BYTES = 64 * 1024
"""The smallest --max-body-bytes: a labelling form with a full 5,000-character rationale fits in it."""


@dataclass
class LabelConfig:
    """Labelling: projects, users, the web app, export and simulated annotators."""

    command: Literal["create", "add-user", "serve", "export", "simulate", "users", "reset-password", "deactivate",
                     "reactivate", "unlock", "revoke-sessions", "reliability"] = "serve"
    """What to do (the word after `rlhfkit label`). users lists accounts; reset-password (password read as for
    add-user), deactivate, reactivate, unlock (lift a login lockout) and revoke-sessions act on --user; each of
    reset-password, deactivate and revoke-sessions ends the user's sessions at once. reliability prints each
    annotator's estimated accuracy and flag for --project or --run, as JSON."""
    db: str = "runs/label/feedback.db"
    """The feedback database: a SQLite file path (created on first use) or a SQLAlchemy URL such as
    postgresql+psycopg://user@host/name."""
    project: str = ""
    """Project name (create, export, simulate, reliability)."""
    run: str = ""
    """export, reliability: a human-in-the-loop rounds run, instead of --project: its round projects are read
    together in round order (export rows get a `round` column; reliability pools each annotator's judgments over
    the rounds)."""
    mode: Literal["pairwise", "ranking", "attributes"] = "pairwise"
    """create: compare two responses (pairwise), rank K of them (ranking), or score each of up to K responses 0-4
    per attribute (attributes, HelpSteer2's scheme)."""
    criteria: list[str] = field(default_factory=list)
    """create, pairwise: answer each item per criterion (rubric mode), e.g. helpfulness,harmlessness,honesty; each
    criterion gets its own A / B / tie / both-bad verdict. Empty: one overall verdict per item."""
    attributes: list[str] = field(default_factory=list)
    """create, --mode attributes: the attributes each response is scored on, 0-4 (default HelpSteer2's
    helpfulness,correctness,coherence,complexity,verbosity)."""
    instructions: str = ""
    """create: guidelines shown to annotators above every task (plain text)."""
    prompts: str = ""
    """create: prompts file (rows with "prompt" or "text"; a playground prompts file works)."""
    responses: list[str] = field(default_factory=list)
    """create: response files, rows {"prompt", "response"} or {"prompt", "responses": [...]}, optional "source"
    (default: the file name); each prompt gets its responses from all files, in file order."""
    models: list[str] = field(default_factory=list)
    """create: model directories that sample the responses instead (response slot k comes from model
    k mod len(models)), through the same rollout code as PPO."""
    responses_per_item: int = 2
    """create: responses per item (2 for pairwise; K for ranking; at most K, at least 1, for attributes)."""
    annotators_per_item: int = 1
    """create: how many different annotators judge each item (overlap, for agreement)."""
    gold: str = ""
    """create: gold items with known answers, rows {"prompt", "responses", "answer"} where answer is A, B, tie or
    both_bad (pairwise) or the index of the best response (ranking); every annotator sees them."""
    max_new_tokens: int = 48
    """create --models: longest sampled response."""
    temperature: float = 1.0
    """create --models: sampling temperature."""
    seed: int = 0
    """Seed for sampling (create --models) and for the simulated annotators and display orders (simulate)."""
    user: str = ""
    """add-user, reset-password, deactivate, reactivate, unlock, revoke-sessions: the user name."""
    role: Literal["admin", "annotator"] = "annotator"
    """add-user: admin (projects, progress, agreement, export) or annotator (labels)."""
    password_file: str = ""
    """add-user, reset-password: read the password from this file's first line; otherwise from the RLHFKIT_PASSWORD
    environment variable, otherwise a prompt. Never a flag: command lines are visible to every local user."""
    host: str = "127.0.0.1"
    """serve: interface to bind; the default serves this machine only. Put a TLS proxy in front before
    binding to a public interface."""
    port: int = 8000
    """serve: TCP port."""
    secret_file: str = ""
    """serve: file holding the session-signing key, created with owner-only permissions on first run
    (default: `secret_key` next to a SQLite database, else ~/.config/rlhfkit/secret_key)."""
    rate_limit: int = 120
    """serve: requests per minute allowed to each user (and to each address before login)."""
    trusted_proxy: list[str] = field(default_factory=list)
    """serve: addresses or networks (10.0.0.5, 10.0.0.0/8) of the reverse proxies in front of the app, whose
    X-Forwarded-For and X-Forwarded-Proto headers are believed. Default none: the client address is the TCP peer's,
    so no client can pick its own address to dodge the login rate limit. Behind a proxy, name it, or every client
    shares the proxy's address and its rate limit."""
    secure_cookies: bool = False
    """serve: mark cookies Secure, so browsers send them only over HTTPS; set it behind a TLS proxy."""
    max_body_bytes: int = 1024 * 1024
    """serve: the largest request body accepted (a larger one is refused with 413 before it is read); at least
    65536."""
    output: str = ""
    """export: the JSONL file to write."""
    kto: bool = False
    """export: write KTO's unpaired {prompt, completion, label} rows instead of pairs."""
    rankings_as: Literal["pairs", "ranking"] = "pairs"
    """export: write each ranking as its C(K,2) pairs or as one K-way row (for the ranking reward loss)."""
    include_gold: bool = False
    """export: also export judgments of gold items."""
    margin_scale: Literal["large", "small"] = "small"
    """export: strength-to-margin map, large = 3/2/1/0 or small = 1, 2/3, 1/3, 0 (Llama 2 section 3.2.2)."""
    conversational: bool = False
    """sample and export: prompts are user turns of a chat (sampled through the model's chat template, exported as
    messages); without it prompts are plain text, sampled and exported as strings."""
    majority: bool = False
    """export: one row per item, its annotators' judgments merged by majority vote (pairs) or Borda count
    (rankings), for projects with overlap (--annotators-per-item > 1); without it, one row per judgment. A rubric
    project votes per criterion."""
    by_criterion: bool = False
    """export, rubric projects: write one standard preference file per criterion next to --output
    (prefs.jsonl -> prefs.helpfulness.jsonl, prefs.honesty.jsonl, ...) instead of one file with a criterion
    column."""
    reliability: bool = False
    """export, pairwise projects: add to every pair row `confidence`, the posterior probability that chosen is truly
    better than rejected under a Dawid & Skene fit of every annotator's accuracy (a soft Bradley-Terry target in
    [0, 1]), and `annotator_accuracy`, its annotator's estimated accuracy. The fit pools --run's rounds."""
    annotators: int = 13
    """simulate: size of the simulated annotator pool (users sim-00, sim-01, ... without passwords)."""


def parse_label_args(argv: list[str]) -> LabelConfig:
    """`create --db x ...` (the command first, as `rlhfkit label create ...` passes it) or `--command create`."""
    if argv and not argv[0].startswith("-"):
        if argv[0] not in COMMANDS:
            raise ConfigError(f"unknown label command {argv[0]!r}; use one of {', '.join(COMMANDS)}.")
        argv = ["--command", argv[0], *argv[1:]]
    return parse_args(LabelConfig, argv, prog="rlhfkit label")


def service_for(cfg: LabelConfig, rng: random.Random | None = None):
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store

    if "://" not in cfg.db:
        Path(cfg.db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return FeedbackService(open_store(cfg.db), rng=rng)


def need(cfg: LabelConfig, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(f"label {cfg.command} needs --{name.replace('_', '-')}.")


# ------------------------------------------------------------------------------------------------- create
def _prompt_text(value: object, path: str, lineno: int) -> str:
    """The prompt to label: a string, or a conversation of exactly one user turn (its text; a playground prompts
    file holds those). Longer conversations are refused rather than cut to their last turn."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "user" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    if not isinstance(value, str):
        raise DataError(path, lineno, "prompt", "must be a string or one user turn for labelling (multi-turn "
                        "conversations are not supported yet; give the user turn as text)")
    return value


def _file_responses(paths: list[str]) -> dict[str, list[tuple[str, str]]]:
    by_prompt: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        for lineno, row in read_rows(path):
            prompt = _prompt_text(row.get("prompt"), path, lineno)
            texts = row.get("responses", [row.get("response")] if "response" in row else None)
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise DataError(path, lineno, "response", "missing or empty; a responses row has \"response\" (a "
                                "string) or \"responses\" (a list of strings)")
            source = row.get("source") or Path(path).stem
            by_prompt.setdefault(" ".join(prompt.split()), []).extend((t, str(source)) for t in texts)
    return by_prompt


def _model_responses(cfg: LabelConfig, prompts: list[str]) -> dict[str, list[tuple[str, str]]]:
    import torch

    from rlhfkit.data.encoding import user_turn
    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.generation import sample

    k = cfg.responses_per_item
    by_prompt: dict[str, list[tuple[str, str]]] = {" ".join(p.split()): [] for p in prompts}
    for m, model_dir in enumerate(cfg.models):
        slots = len(range(m, k, len(cfg.models)))  # response slots m, m + M, m + 2M, ... come from model m
        if slots == 0:
            continue
        tokenizer = load_tokenizer(model_dir)
        model = load_causal_lm(model_dir, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + m)
            # a chat model answers the prompt as a user turn, and export writes the same conversation
            # (conversational), so the labelled pair is encoded for training exactly as it was sampled
            asked = [user_turn(p) if cfg.conversational else p for p in prompts for _ in range(slots)]
            texts = sample(model, tokenizer, asked, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature).texts
        source = Path(model_dir).name
        for i, p in enumerate(prompts):
            by_prompt[" ".join(p.split())].extend((t, source) for t in texts[i * slots : (i + 1) * slots])
    return by_prompt


def create(cfg: LabelConfig) -> dict:
    from rlhfkit.feedback.service import Conflict, FeedbackError, ItemSpec, criteria_names

    need(cfg, "project", "prompts")
    if bool(cfg.responses) == bool(cfg.models):
        raise ConfigError("label create needs either --responses FILES or --models DIRS (not both).")
    if cfg.mode == "pairwise" and cfg.responses_per_item != 2:
        raise ConfigError("a pairwise project has responses_per_item 2; use --mode ranking for more.")
    if cfg.criteria and cfg.mode != "pairwise":
        raise ConfigError(f"--criteria (rubric mode) needs --mode pairwise, not {cfg.mode}; to score responses per "
                          "attribute use --mode attributes --attributes NAMES.")
    if cfg.attributes and cfg.mode != "attributes":
        raise ConfigError("--attributes needs --mode attributes; to compare two responses per criterion use "
                          "--criteria NAMES.")
    if cfg.gold and (cfg.criteria or cfg.mode == "attributes"):
        raise ConfigError("--gold is not supported for projects answered per criterion or attribute; drop --gold.")
    try:  # the names first, before any response is read or sampled
        criteria_names(cfg.mode, cfg.criteria or cfg.attributes or None)
    except FeedbackError as exc:
        raise ConfigError(f"{'--attributes' if cfg.mode == 'attributes' else '--criteria'}: {exc}") from None
    least = 1 if cfg.mode == "attributes" else 2
    if cfg.responses_per_item < least:
        raise ConfigError(f"--responses-per-item must be at least {least} for a {cfg.mode} project, got "
                          f"{cfg.responses_per_item}.")
    prompts = [_prompt_text(p, cfg.prompts, i + 1) for i, p in enumerate(read_prompts(cfg.prompts))]
    found = _file_responses(cfg.responses) if cfg.responses else _model_responses(cfg, prompts)
    items, dropped = [], 0
    for prompt in prompts:
        unique: dict[str, str] = {}
        for text, source in found.get(" ".join(prompt.split()), []):
            unique.setdefault(text.strip(), source)  # identical responses teach nothing; keep the first
        chosen = list(unique.items())[: cfg.responses_per_item]
        if len(chosen) < {"ranking": 2, "attributes": 1}.get(cfg.mode, cfg.responses_per_item):
            dropped += 1
            continue
        items.append(ItemSpec(prompt, [t for t, _ in chosen], [s for _, s in chosen]))
    if not items:
        raise UserError(f"no prompt in {cfg.prompts} has {cfg.responses_per_item} distinct responses; check that the "
                        "responses files use the same prompt texts.")
    gold = _gold_items(cfg) if cfg.gold else []
    svc = service_for(cfg)
    asked = cfg.criteria or cfg.attributes or None  # None: a plain project, or HelpSteer2's attributes
    try:
        project = svc.create_project(cfg.project, cfg.mode, cfg.instructions, cfg.responses_per_item,
                                     cfg.annotators_per_item, criteria=asked)
    except Conflict:
        project = svc.project(cfg.project)
        _same_kind(cfg, project, asked)
        log.info("project %s exists; adding items to it", cfg.project)
    added = svc.add_items(project.id, items + gold)
    summary = {"project": project.name, "items": added, "gold_items": len(gold), "prompts_without_enough_responses": dropped}
    if project.criteria:
        summary["attributes" if project.mode == "attributes" else "criteria"] = list(project.criteria)
    if dropped:
        log.warning("%d prompt(s) had fewer than %d distinct responses and were left out", dropped,
                    cfg.responses_per_item)
    print(json.dumps(summary))
    return summary


def _same_kind(cfg: LabelConfig, project: Any, asked: list[str] | None) -> None:
    """ConfigError when create, adding items to an existing project, asks for other criteria or attributes (or
    another mode of a project answered per criterion) than the project has."""
    if not (project.criteria or asked or cfg.mode == "attributes"):
        return  # plain projects: exactly as before
    if project.mode != cfg.mode:
        raise ConfigError(f"project {project.name} exists as a {project.mode} project; pass --mode {project.mode} "
                          "to add items to it, or pick another --project.")
    if asked is not None and list(asked) != list(project.criteria):
        flag = "--attributes" if project.mode == "attributes" else "--criteria"
        raise ConfigError(f"project {project.name} exists with {flag} {','.join(project.criteria) or '(none)'}, not "
                          f"{','.join(asked)}; pass the same list (or none) to add items to it, or pick another "
                          "--project.")


def _gold_items(cfg: LabelConfig) -> list:
    from rlhfkit.feedback.service import ItemSpec

    out = []
    for lineno, row in read_rows(cfg.gold):
        prompt = _prompt_text(row.get("prompt"), cfg.gold, lineno)
        responses, answer = row.get("responses"), row.get("answer")
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(cfg.gold, lineno, "responses", "must be a list of at least two response strings")
        if cfg.mode == "pairwise" and answer not in ("A", "B", "tie", "both_bad"):
            raise DataError(cfg.gold, lineno, "answer", f"must be A, B, tie or both_bad, got {answer!r}")
        if cfg.mode == "ranking" and not (isinstance(answer, int) and 0 <= answer < len(responses)):
            raise DataError(cfg.gold, lineno, "answer", f"must be the index of the best response, got {answer!r}")
        out.append(ItemSpec(prompt, list(responses), ["gold"] * len(responses),
                            gold_outcome=answer if cfg.mode == "pairwise" else None,
                            gold_top=answer if cfg.mode == "ranking" else None))
    return out


# ----------------------------------------------------------------------------------------------- add-user
def _read_password(cfg: LabelConfig) -> str:
    if cfg.password_file:
        p = Path(cfg.password_file)
        if not p.is_file():
            raise ConfigError(f"password file {p} does not exist.")
        return p.read_text().splitlines()[0] if p.read_text().strip() else ""
    if os.environ.get("RLHFKIT_PASSWORD"):
        return os.environ["RLHFKIT_PASSWORD"]
    if not sys.stdin.isatty():
        raise ConfigError("no password given; set RLHFKIT_PASSWORD or pass --password-file (there are no default "
                          "credentials).")
    first = getpass.getpass(f"password for {cfg.user}: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the two passwords differ; run add-user again.")
    return first


def add_user(cfg: LabelConfig) -> dict:
    need(cfg, "user")
    info = service_for(cfg).add_user(cfg.user, cfg.role, _read_password(cfg))
    print(json.dumps({"user": info.name, "role": info.role}))
    return {"user": info.name, "role": info.role}


# ------------------------------------------------------------------------------------ user management
def _named_user(cfg: LabelConfig) -> tuple[Any, Any]:
    """(service, the --user's UserInfo); ConfigError when there is no such user."""
    need(cfg, "user")
    svc = service_for(cfg)
    info = svc.user_by_name(cfg.user)
    if info is None:
        raise ConfigError(f"there is no user {cfg.user!r} in {cfg.db}; `rlhfkit label users --db {cfg.db}` lists "
                          "them.")
    return svc, info


def _report(summary: dict) -> dict:
    print(json.dumps(summary))
    return summary


def users(cfg: LabelConfig) -> list[dict]:
    rows = [{"user": a.name, "role": a.role, "active": a.active, "can_log_in": a.can_log_in,
             "failed_logins": a.failures, "locked": a.locked_until is not None, "sessions": a.sessions}
            for a in service_for(cfg).accounts()]
    for row in rows:
        print(json.dumps(row))
    return rows


def reset_password(cfg: LabelConfig) -> dict:
    svc, info = _named_user(cfg)
    svc.reset_password(info.id, _read_password(cfg))
    return _report({"user": info.name, "password_reset": True, "sessions_ended": True})


def deactivate(cfg: LabelConfig) -> dict:
    svc, info = _named_user(cfg)
    svc.set_active(info.id, False)
    return _report({"user": info.name, "active": False})


def reactivate(cfg: LabelConfig) -> dict:
    svc, info = _named_user(cfg)
    svc.set_active(info.id, True)
    return _report({"user": info.name, "active": True})


def unlock(cfg: LabelConfig) -> dict:
    svc, info = _named_user(cfg)
    return _report({"user": info.name, "unlocked": svc.unlock(info.name)})


def revoke_sessions(cfg: LabelConfig) -> dict:
    svc, info = _named_user(cfg)
    return _report({"user": info.name, "sessions_ended": svc.revoke_sessions(info.id)})


# ------------------------------------------------------------------------------------------------- export
def _agreement_summary(svc: Any, project: Any) -> dict[str, dict[str, Any]]:
    """Per-criterion agreement of a rubric or attribute project, as the export summary reports it."""
    out = {}
    for name, a in svc.agreement_by_criterion(project.id).items():
        out[name] = {"units": a.units, "percent": None if a.percent is None else round(a.percent, 4),
                     "alpha": None if a.alpha is None else round(a.alpha, 4), "metric": a.metric}
    return out


def criterion_path(output: str | Path, criterion: str) -> Path:
    """Where --by-criterion writes a criterion's file: prefs.jsonl -> prefs.<criterion>.jsonl beside it."""
    p = Path(output)
    return p.with_name(f"{p.stem}.{criterion}{p.suffix}")


def _project_or_run(cfg: LabelConfig) -> None:
    if bool(cfg.project) == bool(cfg.run):
        raise ConfigError(f"label {cfg.command} needs --project P or --run R (one of them).")


def _flags(reports: dict) -> dict:
    """The annotators a reliability fit did not find ok, {name: flag} (per criterion for a rubric project)."""
    flagged = {c: {a.name: a.flag for a in r.annotators if a.flag != "ok"} for c, r in reports.items()}
    return flagged[None] if None in flagged else flagged


def export(cfg: LabelConfig) -> dict:
    from rlhfkit.feedback.export import (
        attribute_rows, export_by_criterion, export_rows, majority_rows, reliability_reports, write_export,
    )

    need(cfg, "output")
    _project_or_run(cfg)
    if cfg.majority and (cfg.kto or cfg.include_gold):
        raise ConfigError("label export --majority writes merged preference rows: drop --kto and "
                          "--include-gold (gold items check annotators, they are not merged).")
    if cfg.reliability and (cfg.majority or cfg.kto):
        raise ConfigError("label export --reliability gives each judgment's pair row a confidence; drop "
                          f"{'--majority (merged rows have no single judgment)' if cfg.majority else '--kto'}.")
    svc = service_for(cfg)
    if cfg.run:
        return _export_run(cfg, svc)
    project = svc.project(cfg.project)
    if project.mode == "attributes":
        return _export_attributes(cfg, svc, project, attribute_rows, write_export)
    if cfg.reliability and project.mode != "pairwise":
        raise ConfigError(f"project {project.name} is a {project.mode} project; --reliability is estimated from "
                          "pairwise judgments only, drop it.")
    reports = reliability_reports(svc, [project]) if cfg.reliability else None
    if cfg.by_criterion:
        if not project.rubric:
            raise ConfigError(f"project {project.name} has no criteria, so --by-criterion has nothing to split; drop "
                              "it (a rubric project is made with label create --criteria).")
        if Path(cfg.output).suffix.lower() not in (".jsonl", ".ndjson"):
            raise ConfigError(f"--output {cfg.output}: the export is JSON Lines; use a .jsonl file name.")
        files, report = export_by_criterion(svc, project.id, majority=cfg.majority, kto=cfg.kto,
                                            include_gold=cfg.include_gold, margin_scale=cfg.margin_scale,
                                            conversational=cfg.conversational, reliability=reports)
        outputs = {}
        for criterion, rows in files.items():
            path = write_export(criterion_path(cfg.output, criterion), rows)
            outputs[criterion] = str(path)
            log.info("%s: %d rows for criterion %s", path, len(rows), criterion)
            if not rows:
                log.warning("criterion %s has no exportable verdict (only ties, both-bad or skips), so %s is empty",
                            criterion, path)
        summary: dict[str, Any] = {"outputs": outputs, "rows": report.criteria, "judgments": report.judgments,
                                   "left_out": report.skipped}
    else:
        if cfg.majority:
            rows, report = majority_rows(svc, project.id, rankings_as=cfg.rankings_as,
                                         margin_scale=cfg.margin_scale, conversational=cfg.conversational)
        else:
            rows, report = export_rows(svc, project.id, kto=cfg.kto, rankings_as=cfg.rankings_as,
                                       include_gold=cfg.include_gold, margin_scale=cfg.margin_scale,
                                       conversational=cfg.conversational, reliability=reports)
        write_export(cfg.output, rows)
        summary = {"output": cfg.output, "rows": report.rows, "judgments": report.judgments,
                   "left_out": report.skipped}
        if project.rubric:
            summary["rows_per_criterion"] = report.criteria
    if cfg.majority:
        summary["items"] = report.items
    if project.rubric:
        summary["agreement"] = _agreement_summary(svc, project)
    if reports is not None:
        summary["flagged_annotators"] = _flags(reports)
    print(json.dumps(summary))
    return summary


def _export_run(cfg: LabelConfig, svc: Any) -> dict:
    """label export --run: every round project's rows in one file, each with its round."""
    from rlhfkit.feedback.export import export_run_rows, reliability_reports, write_export

    if cfg.majority or cfg.kto or cfg.by_criterion:
        flag = "--majority" if cfg.majority else "--kto" if cfg.kto else "--by-criterion"
        raise ConfigError(f"label export --run writes one preference row per judgment of every round; drop {flag} "
                          "(or export one round with --project).")
    projects = svc.round_projects(cfg.run)
    if not projects:
        raise ConfigError(f"run {cfg.run!r} has no round projects in {cfg.db}; check --run (a round project is "
                          "created with a run name and round number).")
    reports = reliability_reports(svc, projects) if cfg.reliability else None
    rows, report = export_run_rows(svc, cfg.run, rankings_as=cfg.rankings_as, include_gold=cfg.include_gold,
                                   margin_scale=cfg.margin_scale, conversational=cfg.conversational,
                                   reliability=reports)
    write_export(cfg.output, rows)
    summary: dict[str, Any] = {"output": cfg.output, "run": cfg.run, "rounds": [p.round for p in projects],
                               "rows": report.rows, "judgments": report.judgments, "left_out": report.skipped}
    if reports is not None:
        summary["flagged_annotators"] = _flags(reports)
    print(json.dumps(summary))
    return summary


# -------------------------------------------------------------------------------------------- reliability
def reliability(cfg: LabelConfig) -> dict:
    """label reliability: the Dawid & Skene fit of --project, or of --run's rounds pooled, as one JSON object
    (per annotator: accuracy, its se, judgments, gold accuracy, overlap, flag, suspicion); a rubric project's
    per criterion."""
    from rlhfkit.feedback.export import reliability_reports

    _project_or_run(cfg)
    svc = service_for(cfg)
    projects = svc.round_projects(cfg.run) if cfg.run else [svc.project(cfg.project)]
    if not projects:
        raise ConfigError(f"run {cfg.run!r} has no round projects in {cfg.db}; check --run.")
    reports = reliability_reports(svc, projects)
    summary: dict[str, Any] = {"projects": [p.name for p in projects]}
    if cfg.run:
        summary["run"] = cfg.run
    if None in reports:
        summary.update(reports[None].to_dict())
    else:
        summary["criteria"] = {c: r.to_dict() for c, r in reports.items()}
    print(json.dumps(summary))
    return summary


def _export_attributes(cfg: LabelConfig, svc: Any, project: Any, attribute_rows: Any, write_export: Any) -> dict:
    """An attribute project's HelpSteer2-style rows; the preference-only flags are refused by name."""
    for flag, on in (("--kto", cfg.kto), ("--majority", cfg.majority), ("--by-criterion", cfg.by_criterion),
                     ("--reliability", cfg.reliability),
                     ("--include-gold", cfg.include_gold), ("--conversational", cfg.conversational),
                     ("--rankings-as ranking", cfg.rankings_as != "pairs")):
        if on:
            raise ConfigError(f"project {project.name} scores attributes and exports HelpSteer2-style rows (one per "
                              f"response, a 0-4 score per attribute); {flag} applies to preference projects, drop "
                              "it.")
    rows, report = attribute_rows(svc, project.id)
    write_export(cfg.output, rows)
    summary = {"output": cfg.output, "rows": report.rows, "judgments": report.judgments, "left_out": report.skipped,
               "attributes": list(project.criteria), "agreement": _agreement_summary(svc, project)}
    print(json.dumps(summary))
    return summary
