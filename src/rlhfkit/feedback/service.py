"""The service layer: the one door through which the web pages, simulated annotators and the CLI create work,
serve the queue, record judgments and read progress, agreement and gold accuracy.

Every method runs in its own write transaction (BEGIN IMMEDIATE on SQLite, see store.py) and returns plain
dataclasses, never ORM objects, so callers cannot touch the database behind the service's back.

Accounts: logins lock a name after repeated failures (with back-off, stored, so a restart does not reset it);
sessions live in the database, so logout, an admin's revocation, a deactivation or a password change ends them
at once."""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import random
import re
import secrets
import statistics
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Mapping, Sequence

from sqlalchemy import bindparam, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from rlhfkit.data.preference import STRENGTHS
from rlhfkit.errors import UserError
from rlhfkit.feedback.agreement import (
    cohen_kappa, krippendorff_alpha_interval, krippendorff_alpha_nominal, percent_agreement,
)
from rlhfkit.feedback.reliability import (
    FLAG_PROBABILITY, MIN_INFORMATIVE, PRIOR, RANDOM_BELOW, Label, ReliabilityReport, check_settings, dawid_skene,
)
from rlhfkit.feedback.store import (
    FLAGS, HELPSTEER2_ATTRIBUTES, LIKERT, MODES, OUTCOMES, ROLES, VERDICTS, Assignment, AuthSession, Gold, Item,
    Judgment, LoginFailures, Project, Store, User, now,
)

MAX_RATIONALE = 5000
MIN_PASSWORD, MAX_PASSWORD = 8, 1024
MAX_ID = 2**63 - 1
"""Ids and integer fields are SQLite INTEGERs (signed 64-bit); a larger Python int cannot even be bound."""
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_SUBMISSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_CRITERION_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
"""Criterion and attribute names: they become JSON keys, form values and export file names (prefs.<name>.jsonl)."""
RESERVED_ATTRIBUTES = frozenset({"prompt", "response", "annotator", "source", "response_source", "item_id"})
"""Columns of an attribute export row, so no attribute may take their names."""


# ------------------------------------------------------------------------------------------------- errors
class FeedbackError(UserError):
    """A request the service refuses; `status` is the HTTP status the web app answers with."""

    status = 422


class NotFound(FeedbackError):
    status = 404


class Forbidden(FeedbackError):
    status = 403


class Conflict(FeedbackError):
    status = 409


class AccountLocked(FeedbackError):
    """Too many failed logins for this name; retry_after_s says when the next attempt is allowed."""

    status = 429

    def __init__(self, retry_after_s: float):
        self.retry_after_s = retry_after_s
        minutes = max(1, round(retry_after_s / 60))
        super().__init__(f"too many failed logins: this account is locked for about {minutes} minute(s); try again "
                         "then, or ask an admin to unlock it.")


def _check_password(password: str, whose: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise FeedbackError(f"the password for {whose} is too short; use at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD:
        raise FeedbackError(f"the password for {whose} is too long; use at most {MAX_PASSWORD} characters.")


def _token_id(token: str) -> str:
    # a session token is 256 random bits, so a plain SHA-256 (no salt, no stretching) cannot be reversed
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- passwords
# scrypt from the standard library (RFC 7914) at OWASP's recommended cost (N=2^17, r=8, p=1: 128 MiB and a few
# tenths of a second per hash). The parameters are stored in each hash, so tests may lower SCRYPT_N to run fast
# and existing hashes keep verifying after a change.
SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**17, 8, 1


# each hash holds 128 MiB; a burst of logins must not multiply that by the number of server threads
_HASHING = threading.BoundedSemaphore(2)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    with _HASHING:
        return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=dklen)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, _SCRYPT_R, _SCRYPT_P, 32)
    return f"scrypt${SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p), len(digest) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


# ------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    role: str


@dataclass(frozen=True)
class Account:
    """A user as the admin pages and `rlhfkit label users` show it."""

    id: int
    name: str
    role: str
    active: bool
    can_log_in: bool
    """False for simulated annotators (no password)."""
    failures: int
    """Failed logins since the last success."""
    locked_until: float | None
    """Unix time the lock ends, or None when not locked."""
    sessions: int
    """Sessions that still work (not expired, not revoked)."""
    last_seen: float | None


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    name: str
    mode: str
    instructions: str
    responses_per_item: int
    annotators_per_item: int
    criteria: tuple[str, ...] = ()
    """A rubric project's criteria (pairwise mode) or an attribute project's attributes; () otherwise."""
    run: str | None = None
    """The rounds run this project is a round of (None outside a run)."""
    round: int | None = None
    """Its round number in the run, 1-based (None outside a run)."""
    ordered: bool = False
    """True when its queue goes by item priority (some item has a priority or its own annotator count)."""
    gold_every: int | None = None
    """Ordered projects: every gold_every-th task of an annotator is gold until all are answered (None: spread)."""

    @property
    def rubric(self) -> bool:
        """A pairwise project answered criterion by criterion."""
        return self.mode == "pairwise" and bool(self.criteria)


@dataclass(frozen=True)
class Verdict:
    """A rubric judgment's answer on one criterion: A, B, tie or both_bad, with an optional strength for A or B."""

    outcome: str
    strength: str | None = None


@dataclass
class ItemSpec:
    """One item to create: a prompt, its responses with their source ids, and optionally a known answer
    (gold_outcome for pairwise projects, gold_top for ranking projects)."""

    prompt: str
    responses: list[str]
    sources: list[str] = field(default_factory=list)
    gold_outcome: str | None = None
    gold_top: int | None = None
    priority: float | None = None
    """Queue order: fresh items go out highest priority first (see `next_task`); None sorts after every item
    with one. Giving any item a priority (or annotators) makes the project's queue ordered."""
    annotators: int | None = None
    """How many annotators judge this item (at least 1), instead of the project's annotators_per_item: e.g. 3 on
    a share of the items, for agreement and annotator reliability, and 1 on the rest."""


@dataclass(frozen=True)
class Task:
    """What an annotator is shown: responses in display order (display_order[i] is the item's response index
    shown in position i)."""

    assignment_id: int
    item_id: int
    project: ProjectInfo
    prompt: str
    responses: list[str]
    display_order: list[int]

    @property
    def shown(self) -> list[tuple[int, str]]:
        """(response index, text) in the order shown."""
        return [(i, self.responses[i]) for i in self.display_order]


@dataclass(frozen=True)
class Ack:
    judgment_id: int
    duplicate: bool
    """True when this submission id was already stored (a retry); nothing new was written."""


@dataclass
class AnnotatorProgress:
    name: str
    judgments: int = 0
    skips: int = 0
    flagged: int = 0
    median_seconds: float | None = None
    gold_seen: int = 0
    gold_correct: int = 0

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_seen if self.gold_seen else None


@dataclass
class Progress:
    items: int
    gold_items: int
    judgments: int
    complete_items: int
    """Non-gold items with as many judgments (skips excluded) as they ask for (their own annotator count, else
    the project's annotators_per_item)."""
    annotators: list[AnnotatorProgress]
    labels: int = 0
    """Non-skip judgments of non-gold items (A, B, tie, both bad; rankings; rubric and attribute answers): what a
    rounds loop counts against its label budget."""
    skips: int = 0
    """Skipped tasks, gold items included."""
    gold_labels: int = 0
    """Non-skip judgments of gold items."""
    slots: int = 0
    """Labels the non-gold items ask for in all (the sum of their annotator counts): a label budget above it is
    never met."""
    outcomes: dict[str, int] = field(default_factory=dict)
    """A plain pairwise project's labels by outcome (A, B, tie, both_bad); empty for other projects."""


@dataclass
class Agreement:
    units: int
    """Items with at least two non-skip labels."""
    percent: float | None
    alpha: float | None
    kappa: dict[str, float]
    """Cohen's kappa per annotator pair ("a|b") that shares at least `min_shared` items."""
    label: str
    """What was compared: the pairwise outcome, or the response ranked first."""
    metric: str = "nominal"
    """Krippendorff's difference function: nominal (outcomes, rankings) or interval (Likert attribute scores)."""


@dataclass(frozen=True)
class Flagged:
    item_id: int
    prompt: str
    annotator: str
    flags: list[str]
    rationale: str


# ------------------------------------------------------------------------------------------------- service
def _user_info(u: User) -> UserInfo:
    return UserInfo(u.id, u.name, u.role)


def _project_info(p: Project) -> ProjectInfo:
    return ProjectInfo(p.id, p.name, p.mode, p.instructions, p.responses_per_item, p.annotators_per_item,
                       tuple(p.criteria or ()), p.run, p.round, bool(p.ordered), p.gold_every)


def criteria_names(mode: str, criteria: Sequence[str] | None) -> list[str] | None:
    """The criteria a new project stores: None for a plain project, the attributes (HelpSteer2's five by default)
    for an attribute project. Each name must be a short lower-case identifier, and unique."""
    if mode == "attributes" and criteria is None:
        return list(HELPSTEER2_ATTRIBUTES)
    if not criteria:
        if mode == "attributes":
            raise FeedbackError("an attribute project needs at least one attribute; leave them out to get "
                                f"HelpSteer2's {', '.join(HELPSTEER2_ATTRIBUTES)}.")
        return None
    what = "attribute" if mode == "attributes" else "criterion"
    if mode == "ranking":
        raise FeedbackError("criteria (rubric mode) are for pairwise projects; use mode pairwise, or drop the "
                            "criteria to rank responses overall.")
    if isinstance(criteria, str):
        raise FeedbackError(f"criteria must be a list of names, got the string {criteria!r}.")
    names = list(criteria)
    for name in names:
        if not isinstance(name, str) or not _CRITERION_RE.match(name):
            raise FeedbackError(f"{what} name {name!r} is not allowed; use a lower-case letter then up to 39 "
                                "lower-case letters, digits or '_' (e.g. helpfulness).")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FeedbackError(f"{what} {duplicates[0]!r} is listed twice; name each {what} once.")
    if mode == "attributes":
        clash = sorted(RESERVED_ATTRIBUTES & set(names))
        if clash:
            raise FeedbackError(f"attribute {clash[0]!r} would clash with the export column of that name; rename "
                                "it.")
    return names


def _check_priority(priority: Any, where: str) -> None:
    if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not math.isfinite(priority):
        raise FeedbackError(f"{where}: priority must be a finite number (higher goes out first), got {priority!r}.")


def label_of(mode: str, outcome: str | None, ranking: list[list[int]] | None) -> Any:
    """The nominal label agreement and gold accuracy compare: the outcome (pairwise) or the response(s) ranked
    first (ranking); None for skips."""
    if outcome == "skip":
        return None
    if mode == "pairwise":
        return outcome
    return tuple(sorted(ranking[0])) if ranking else None


def _agreement(by_unit: Mapping[Any, Mapping[str, Any]], min_shared: int | None,
               alpha: Callable[[list[list[Any]]], float | None], label: str, metric: str = "nominal") -> Agreement:
    """Agreement over units (unit -> {rater: label}): percent agreement and alpha over everyone, and Cohen's
    kappa per rater pair sharing at least min_shared units (no kappa when min_shared is None)."""
    raters = sorted({n for labels in by_unit.values() for n in labels})
    units = [[labels.get(r) for r in raters] for labels in by_unit.values()]
    kappa = {}
    for a, b in combinations(raters, 2) if min_shared is not None else ():
        la = [labels.get(a) for labels in by_unit.values()]
        lb = [labels.get(b) for labels in by_unit.values()]
        shared = sum(x is not None and y is not None for x, y in zip(la, lb))
        if shared >= min_shared:
            kappa[f"{a}|{b}"] = cohen_kappa(la, lb)
    return Agreement(units=sum(len(labels) >= 2 for labels in by_unit.values()), percent=percent_agreement(units),
                     alpha=alpha(units), kappa=kappa, label=label, metric=metric)


@functools.cache
def _queue_statements() -> dict[str, Any]:
    """The statements next_task and submit run for every task, built once. A labelling run issues each of them
    thousands of times, and building the expression and its cache key on every call cost more than SQLite's
    execution of it: a prebuilt statement keeps its cache key, and only its parameters change (:project,
    :user, :k, :cutoff, :done_below, :frontier, :submission)."""
    project, user, k = bindparam("project"), bindparam("user"), bindparam("k")
    is_gold = exists().where(Gold.item_id == Item.id)
    judged = (select(func.count()).select_from(Assignment)
              .where(Assignment.item_id == Item.id, Assignment.completed_at.is_not(None))
              .correlate(Item).scalar_subquery())
    held = (select(func.count()).select_from(Assignment)
            .where(Assignment.item_id == Item.id,
                   or_(Assignment.completed_at.is_not(None), Assignment.created_at > bindparam("cutoff")))
            .correlate(Item).scalar_subquery())
    mine = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user)
    by_hold = (held.desc(), Item.position)
    return {
        "open": select(Assignment, Item).join(Item, Item.id == Assignment.item_id).where(
            Assignment.user_id == user, Item.project_id == project,
            Assignment.completed_at.is_(None)).order_by(Assignment.id).limit(1),
        # walked in id order from the hint, stopping at the first open item (a min() would visit the whole tail)
        "first_open": select(Item.id).where(Item.project_id == project, Item.id >= bindparam("done_below"),
                                            ~is_gold, judged < k).order_by(Item.id).limit(1),
        "last": select(func.max(Item.id)).where(Item.project_id == project),
        "frontier": select(func.max(Item.id)).join(Assignment, Assignment.item_id == Item.id)
                    .where(Item.project_id == project),
        # two queries, not one with an OR: the window is an id range and gold items are looked up from their
        # table (an OR, or a join SQLite may start from items, walks every item of the project)
        "window": select(Item, held).where(Item.id.between(bindparam("done_below"), bindparam("frontier")),
                                           Item.project_id == project, ~mine, or_(is_gold, held < k))
                  .order_by(*by_hold).limit(1),
        "gold": select(Item, held).where(Item.id.in_(select(Gold.item_id)), Item.project_id == project, ~mine)
                .order_by(*by_hold).limit(1),
        # in id order, which is position order within a project (add_items numbers both in insertion order)
        "fresh": select(Item).where(Item.project_id == project, Item.id > bindparam("frontier"),
                                    ~exists().where(Assignment.item_id == Item.id)).order_by(Item.id).limit(1),
        "submission": select(Judgment).where(Judgment.submission_id == bindparam("submission")),
    }


@dataclass
class QueueHints:
    """Where a project's queue stands, as this service last saw it: every non-gold item below `done_below` is
    done, and `frontier` is the highest item id handed out. Only hints: every pick is checked exactly in SQL."""

    done_below: int
    frontier: int


class FeedbackService:
    """All reads and writes of labelling work. `rng` draws display orders (pass a seeded random.Random for
    reproducible simulations); `assignment_ttl_s` frees an item slot held by someone who never submitted.

    Logins: after `lockout_after` consecutive failures a name is locked for `lockout_base_s`, doubling with each
    further failure up to `lockout_max_s` (OWASP's authentication cheat sheet: exponential back-off rather than a
    permanent lock, which would let anyone lock anyone out for good)."""

    def __init__(self, store: Store, rng: random.Random | None = None, assignment_ttl_s: float = 3600.0,
                 lockout_after: int = 5, lockout_base_s: float = 60.0, lockout_max_s: float = 3600.0):
        self.store = store
        self.rng = rng or random.SystemRandom()
        self.assignment_ttl_s = assignment_ttl_s
        self.lockout_after, self.lockout_base_s, self.lockout_max_s = lockout_after, lockout_base_s, lockout_max_s
        # per project QueueHints (done_below, frontier item ids): hints that keep next_task's queries to the few items in
        # play (see _pick_item); they are only hints, every pick is checked exactly in SQL
        self._hints: dict[int, QueueHints] = {}

    # ---------------------------------------------------------------------------------------------- users
    def add_user(self, name: str, role: str, password: str | None) -> UserInfo:
        """Create a user. password None makes an account that cannot log in (simulated annotators)."""
        if not _NAME_RE.match(name):
            raise FeedbackError(f"user name {name!r} is not allowed; use 1-64 letters, digits, '_', '.', '@' or '-'.")
        if role not in ROLES:
            raise FeedbackError(f"role {role!r} is unknown; use one of {', '.join(ROLES)}.")
        if password is not None:
            _check_password(password, name)
        hashed = hash_password(password) if password is not None else None
        with self.store.session() as s, s.begin():
            if s.scalar(select(User).where(User.name == name)) is not None:
                raise Conflict(f"user {name!r} already exists; pick another name.")
            user = User(name=name, role=role, password_hash=hashed)
            s.add(user)
            s.flush()
            return _user_info(user)

    def ensure_user(self, name: str, role: str = "annotator") -> UserInfo:
        """The user with this name, created without a password if missing (for simulated annotators)."""
        with self.store.session() as s, s.begin():
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                user = User(name=name, role=role, password_hash=None)
                s.add(user)
                s.flush()
            return _user_info(user)

    def authenticate(self, name: str, password: str) -> UserInfo | None:
        """The user when name and password match; None otherwise (a failure, counted towards the name's lock).
        AccountLocked while the name is locked (the password is not even checked); Forbidden for the right
        password of a deactivated account."""
        if not _NAME_RE.match(name):  # no account can have this name; spend the time a real check takes
            verify_password(password, _dummy_hash())
            return None
        self._check_lock(name)
        with self.store.session() as s:
            user = s.scalar(select(User).where(User.name == name))
            stored = user.password_hash if user is not None else None
            info = _user_info(user) if user is not None else None
            active = user is not None and user.active
        if stored is None:
            # spend the same time as a real check, so response times do not reveal which names exist
            verify_password(password, _dummy_hash())
            self._record_failure(name)
            return None
        if not verify_password(password, stored):
            self._record_failure(name)
            return None
        self._clear_failures(name)
        if not active:
            raise Forbidden(f"the account {name} is deactivated; ask an admin to reactivate it.")
        return info

    def _check_lock(self, name: str) -> None:
        with self.store.session() as s:
            row = s.get(LoginFailures, name)
            t = now()
            if row is not None and row.locked_until is not None and row.locked_until > t:
                raise AccountLocked(row.locked_until - t)

    def _record_failure(self, name: str) -> None:
        t = now()
        with self.store.session() as s, s.begin():
            row = s.get(LoginFailures, name)
            if row is None:
                row = LoginFailures(name=name, failures=0, last_failure_at=t)
                s.add(row)
            row.failures += 1
            row.last_failure_at = t
            over = row.failures - self.lockout_after
            if over >= 0:
                row.locked_until = t + min(self.lockout_base_s * 2 ** min(over, 32), self.lockout_max_s)
            # forget names nobody has tried for a day (guessed names would otherwise pile up)
            s.execute(LoginFailures.__table__.delete().where(
                LoginFailures.last_failure_at < t - 86400,
                or_(LoginFailures.locked_until.is_(None), LoginFailures.locked_until < t)))

    def _clear_failures(self, name: str) -> bool:
        with self.store.session() as s, s.begin():
            row = s.get(LoginFailures, name)
            if row is not None:
                s.delete(row)
            return row is not None

    def unlock(self, name: str) -> bool:
        """Lift a name's lock and forget its failures (an admin's action); True if it had any."""
        return self._clear_failures(name)

    # ------------------------------------------------------------------------------------------- sessions
    def create_session(self, user_id: int, ttl_s: float) -> str:
        """A new session for the user, valid for ttl_s seconds; returns the token for the cookie (the database
        keeps only its hash)."""
        token = secrets.token_urlsafe(32)
        t = now()
        with self.store.session() as s, s.begin():
            s.add(AuthSession(id=_token_id(token), user_id=user_id, created_at=t, last_seen_at=t,
                              expires_at=t + ttl_s))
            s.execute(AuthSession.__table__.delete().where(AuthSession.expires_at < t))  # expired: useless
        return token

    def session_user(self, token: str | None) -> tuple[UserInfo, str] | None:
        """(user, session id) of a session that works: known, unexpired, not revoked, its user active."""
        if not token or not _TOKEN_RE.match(token):
            return None
        t = now()
        with self.store.session() as s, s.begin():
            row = s.execute(select(AuthSession, User).join(User, User.id == AuthSession.user_id)
                            .where(AuthSession.id == _token_id(token))).first()
            if row is None:
                return None
            session, user = row
            if session.revoked_at is not None or session.expires_at <= t or not user.active:
                return None
            if t - session.last_seen_at > 60:
                session.last_seen_at = t
            return _user_info(user), session.id

    def end_session(self, session_id: str) -> None:
        """Revoke one session (logout)."""
        with self.store.session() as s, s.begin():
            session = s.get(AuthSession, session_id)
            if session is not None and session.revoked_at is None:
                session.revoked_at = now()

    def revoke_sessions(self, user_id: int, keep: str | None = None) -> int:
        """Revoke every working session of the user except `keep`; returns how many were ended."""
        t = now()
        with self.store.session() as s, s.begin():
            rows = s.scalars(select(AuthSession).where(AuthSession.user_id == user_id,
                                                       AuthSession.revoked_at.is_(None),
                                                       AuthSession.expires_at > t)).all()
            ended = 0
            for row in rows:
                if row.id != keep:
                    row.revoked_at = t
                    ended += 1
            return ended

    # ------------------------------------------------------------------------------------- administration
    def _user_row(self, s: Any, user_id: int) -> User:
        user = s.get(User, user_id) if 0 < user_id <= MAX_ID else None
        if user is None:
            raise NotFound(f"user {user_id} does not exist.")
        return user

    def set_active(self, user_id: int, active: bool) -> UserInfo:
        """Deactivate (every session ends at once) or reactivate a user."""
        with self.store.session() as s, s.begin():
            user = self._user_row(s, user_id)
            user.active = active
            info = _user_info(user)
        if not active:
            self.revoke_sessions(user_id)
        return info

    def reset_password(self, user_id: int, password: str, keep_session: str | None = None) -> UserInfo:
        """Set a user's password (an admin's reset): ends the user's sessions (but keep_session) and lifts any
        lock on the name."""
        with self.store.session() as s:
            name = self._user_row(s, user_id).name
        _check_password(password, name)
        hashed = hash_password(password)
        with self.store.session() as s, s.begin():
            user = self._user_row(s, user_id)
            user.password_hash = hashed
            info = _user_info(user)
        self.revoke_sessions(user_id, keep=keep_session)
        self._clear_failures(info.name)
        return info

    def change_password(self, user_id: int, current: str, new: str, keep_session: str | None) -> None:
        """A user changes their own password: the current one must be right (a wrong one counts as a failed
        login, so a stolen session cannot guess it), and every other session of theirs ends."""
        with self.store.session() as s:
            user = self._user_row(s, user_id)
            name, stored = user.name, user.password_hash
        self._check_lock(name)
        if not verify_password(current, stored):
            self._record_failure(name)
            raise Forbidden("the current password is wrong.")
        self._clear_failures(name)
        self.reset_password(user_id, new, keep_session=keep_session)

    def accounts(self) -> list[Account]:
        t = now()
        with self.store.session() as s:
            users = s.scalars(select(User).order_by(User.name)).all()
            failures = {f.name: f for f in s.scalars(select(LoginFailures))}
            live = dict(s.execute(select(AuthSession.user_id, func.count()).where(
                AuthSession.revoked_at.is_(None), AuthSession.expires_at > t).group_by(AuthSession.user_id)).all())
            seen = dict(s.execute(select(AuthSession.user_id, func.max(AuthSession.last_seen_at))
                                  .group_by(AuthSession.user_id)).all())
        out = []
        for u in users:
            f = failures.get(u.name)
            locked = f.locked_until if f is not None and f.locked_until is not None and f.locked_until > t else None
            out.append(Account(u.id, u.name, u.role, u.active, u.password_hash is not None,
                               f.failures if f is not None else 0, locked, live.get(u.id, 0), seen.get(u.id)))
        return out

    def user(self, user_id: int) -> UserInfo | None:
        with self.store.session() as s:
            u = s.get(User, user_id) if abs(user_id) <= MAX_ID else None
            return _user_info(u) if u is not None else None

    def user_by_name(self, name: str) -> UserInfo | None:
        with self.store.session() as s:
            u = s.scalar(select(User).where(User.name == name))
            return _user_info(u) if u is not None else None

    # ------------------------------------------------------------------------------------------- projects
    def create_project(self, name: str, mode: str = "pairwise", instructions: str = "", responses_per_item: int = 2,
                       annotators_per_item: int = 1, criteria: Sequence[str] | None = None, run: str | None = None,
                       round: int | None = None, gold_every: int | None = None) -> ProjectInfo:
        """A new project. criteria: for mode pairwise, the criteria of a rubric project (each judgment answers A, B,
        tie or both bad per criterion); for mode attributes, the attributes every response is scored 0-4 on
        (HelpSteer2's five when None); ranking projects take none. run and round (1-based) make it round `round`
        of a human-in-the-loop rounds run (`round_projects(run)` lists them); a run has one project per round.
        gold_every: in an ordered queue, every gold_every-th task of an annotator is a gold item until they have
        answered all of them (None: gold items spread evenly over the project's items)."""
        if not _NAME_RE.match(name):
            raise FeedbackError(f"project name {name!r} is not allowed; use 1-64 letters, digits, '_', '.', '@' "
                                "or '-'.")
        if mode not in MODES:
            raise FeedbackError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}.")
        if mode == "pairwise" and responses_per_item != 2:
            raise FeedbackError(f"a pairwise project shows 2 responses per item, not {responses_per_item}; use "
                                "mode ranking for more.")
        if responses_per_item < (1 if mode == "attributes" else 2):
            raise FeedbackError(f"responses_per_item must be at least {1 if mode == 'attributes' else 2}, got "
                                f"{responses_per_item}.")
        names = criteria_names(mode, criteria)
        if annotators_per_item < 1:
            raise FeedbackError(f"annotators_per_item must be at least 1, got {annotators_per_item}.")
        if run is not None and not _NAME_RE.match(run):
            raise FeedbackError(f"run name {run!r} is not allowed; use 1-64 letters, digits, '_', '.', '@' or '-'.")
        if (run is None) != (round is None):
            raise FeedbackError("a round project needs both a run name and a round number (or neither); got "
                                f"run={run!r}, round={round!r}.")
        if round is not None and (isinstance(round, bool) or not isinstance(round, int) or not 1 <= round <= MAX_ID):
            raise FeedbackError(f"round must be a whole number from 1, got {round!r}.")
        if gold_every is not None and (isinstance(gold_every, bool) or not isinstance(gold_every, int)
                                       or not 1 <= gold_every <= MAX_ID):
            raise FeedbackError(f"gold_every must be a whole number from 1 (1: gold items first), got {gold_every!r}.")
        with self.store.session() as s, s.begin():
            if s.scalar(select(Project).where(Project.name == name)) is not None:
                raise Conflict(f"project {name!r} already exists; pick another name or add items to it.")
            if run is not None:
                taken = s.scalar(select(Project.name).where(Project.run == run, Project.round == round))
                if taken is not None:
                    raise Conflict(f"run {run!r} already has round {round} (project {taken!r}); use the next round "
                                   "number or another run name.")
            p = Project(name=name, mode=mode, instructions=instructions, responses_per_item=responses_per_item,
                        annotators_per_item=annotators_per_item, criteria=names, run=run, round=round,
                        gold_every=gold_every)
            s.add(p)
            s.flush()
            return _project_info(p)

    def project(self, name_or_id: str | int) -> ProjectInfo:
        with self.store.session() as s:
            if isinstance(name_or_id, int):
                p = s.get(Project, name_or_id) if abs(name_or_id) <= MAX_ID else None
            else:
                p = s.scalar(select(Project).where(Project.name == name_or_id))
            if p is None:
                raise NotFound(f"project {name_or_id!r} does not exist; create it with `rlhfkit label create`.")
            return _project_info(p)

    def projects(self) -> list[ProjectInfo]:
        with self.store.session() as s:
            return [_project_info(p) for p in s.scalars(select(Project).order_by(Project.id))]

    def round_projects(self, run: str) -> list[ProjectInfo]:
        """The projects of a rounds run, by round number; [] for a run with none."""
        with self.store.session() as s:
            return [_project_info(p) for p in s.scalars(select(Project).where(Project.run == run)
                                                         .order_by(Project.round))]

    def add_items(self, project_id: int, items: Sequence[ItemSpec]) -> int:
        """Append items to a project; returns how many were added. A pairwise item has exactly 2 responses, a
        ranking item 2..responses_per_item, an attribute item 1..responses_per_item; identical responses in one
        item are an error. Gold items need a project without criteria."""
        project = self.project(project_id)
        rows = []
        for n, spec in enumerate(items):
            where = f"item {n} ({spec.prompt[:40]!r})"
            if not spec.prompt.strip():
                raise FeedbackError(f"{where}: the prompt is empty.")
            k = len(spec.responses)
            if project.mode == "pairwise" and k != 2:
                raise FeedbackError(f"{where}: a pairwise item needs exactly 2 responses, got {k}.")
            least = 1 if project.mode == "attributes" else 2
            if not least <= k <= project.responses_per_item:
                raise FeedbackError(f"{where}: needs {least} to {project.responses_per_item} responses, got {k}.")
            if len({r.strip() for r in spec.responses}) < k:
                raise FeedbackError(f"{where}: two responses are identical, so comparing them teaches nothing; "
                                    "drop the duplicate.")
            sources = list(spec.sources) or [""] * k
            if len(sources) != k:
                raise FeedbackError(f"{where}: {len(sources)} source ids for {k} responses.")
            if spec.gold_outcome is not None and (project.mode != "pairwise" or spec.gold_outcome not in OUTCOMES[:4]):
                raise FeedbackError(f"{where}: gold_outcome {spec.gold_outcome!r} needs a pairwise project and one "
                                    "of A, B, tie, both_bad.")
            if spec.gold_top is not None and (project.mode != "ranking" or not 0 <= spec.gold_top < k):
                raise FeedbackError(f"{where}: gold_top {spec.gold_top!r} needs a ranking project and a response "
                                    "index.")
            if project.criteria and (spec.gold_outcome is not None or spec.gold_top is not None):
                raise FeedbackError(f"{where}: gold items are not supported in project {project.name!r}, which is "
                                    f"answered per {'attribute' if project.mode == 'attributes' else 'criterion'}; "
                                    "leave the gold answer out.")
            own = spec.annotators
            if own is not None and (isinstance(own, bool) or not isinstance(own, int) or not 1 <= own <= MAX_ID):
                raise FeedbackError(f"{where}: annotators must be a whole number of at least 1, got {own!r}; leave it "
                                    f"None for the project's {project.annotators_per_item}.")
            if spec.priority is not None:
                _check_priority(spec.priority, where)
            rows.append((spec, sources))
        ordered = any(spec.priority is not None or spec.annotators is not None for spec, _ in rows)
        with self.store.session() as s, s.begin():
            if ordered:
                s.get(Project, project_id).ordered = True
            start = s.scalar(select(func.coalesce(func.max(Item.position), -1)).where(
                Item.project_id == project_id)) + 1
            for offset, (spec, sources) in enumerate(rows):
                item = Item(project_id=project_id, prompt=spec.prompt, position=start + offset,
                            responses=[{"text": t, "source": src} for t, src in zip(spec.responses, sources)],
                            priority=None if spec.priority is None else float(spec.priority),
                            annotators=spec.annotators)
                s.add(item)
                if spec.gold_outcome is not None or spec.gold_top is not None:
                    s.flush()
                    s.add(Gold(item_id=item.id, outcome=spec.gold_outcome, top=spec.gold_top))
        return len(rows)

    # ---------------------------------------------------------------------------------------------- queue
    def item_prompts(self, project_id: int) -> list[tuple[int, str]]:
        """(item id, prompt) of every item of a project, in id order."""
        with self.store.session() as s:
            return [(i, p) for i, p in s.execute(select(Item.id, Item.prompt).where(Item.project_id == project_id)
                                                 .order_by(Item.id))]

    def gold_item_ids(self, project_id: int) -> set[int]:
        """Ids of the project's gold items."""
        with self.store.session() as s:
            return set(s.scalars(select(Gold.item_id).join(Item, Item.id == Gold.item_id)
                                 .where(Item.project_id == project_id)))

    def next_task(self, user_id: int, project_id: int) -> Task | None:
        """The user's open task in the project, else a new one: an item they have never been given, gold items
        for everyone, other items only while fewer than annotators_per_item people hold them (started items
        first, so items complete before new ones open). None when nothing is left for this user.

        In position order (`_pick_item`), unless the project's queue is ordered (an item has a priority or its
        own annotator count): then by priority, with gold items spread out (`_pick_ordered`)."""
        with self.store.session() as s, s.begin():
            project = s.get(Project, project_id)
            if project is None:
                raise NotFound(f"project {project_id} does not exist.")
            open_one = s.execute(_queue_statements()["open"], {"user": user_id, "project": project_id}).first()
            if open_one is not None:
                a, item = open_one
                return Task(a.id, item.id, _project_info(project), item.prompt,
                            [r["text"] for r in item.responses], list(a.display_order))
            pick = self._pick_ordered if project.ordered else self._pick_item
            item = pick(s, project, user_id, now() - self.assignment_ttl_s)
            if item is None:
                return None
            order = list(range(len(item.responses)))
            self.rng.shuffle(order)  # position bias: which response is shown first is random and recorded
            a = Assignment(item_id=item.id, user_id=user_id, display_order=order)
            s.add(a)
            s.flush()
            return Task(a.id, item.id, _project_info(project), item.prompt, [r["text"] for r in item.responses],
                        order)

    def _pick_item(self, s: Any, project: Project, user_id: int, cutoff: float) -> Item | None:
        """The item next_task hands out: not given to this user before, gold or held by fewer than
        annotators_per_item people (a judgment, or an assignment younger than the TTL), the most-held first, then
        by position. Exactly what one query over every item of the project would pick, without that query: it
        grew with the project, and handing out n items cost O(n^2) (a 21,600-item project took minutes).

        Items are handed out in position order, so at any time the project splits into a done prefix (every
        non-gold item judged annotators_per_item times: never eligible again, as judgments are never deleted and
        the count is fixed), a short window in play, and a fresh tail nobody was ever given. done_below (an item
        id under which everything non-gold is done) and frontier (the highest item id this service handed out)
        bound the window; gold items are always looked at. Another process may hand out items meanwhile: the
        window then misses only items it started past our frontier, which the fresh-tail query steps over (and
        the window takes in once the frontier passes them, or at the end of the project), so no item is ever
        given out wrongly."""
        q = _queue_statements()
        at = {"project": project.id, "user": user_id, "k": project.annotators_per_item, "cutoff": cutoff}
        hints = self._hints.get(project.id)
        if hints is None:
            hints = self._hints.setdefault(project.id, QueueHints(0, s.scalar(q["frontier"], at) or 0))
        first_open = s.scalar(q["first_open"], {**at, "done_below": hints.done_below})
        if first_open is None:  # everything non-gold is done: past the last item
            first_open = (s.scalar(q["last"], at) or 0) + 1
        hints.done_below = max(hints.done_below, first_open)

        def best_in_play() -> tuple[Item, int] | None:
            window = {**at, "done_below": hints.done_below, "frontier": hints.frontier}
            rows = [row for name in ("window", "gold") if (row := s.execute(q[name], window).first()) is not None]
            best = min(rows, key=lambda row: (-row[1], row[0].position), default=None)
            return None if best is None else (best[0], best[1])

        started = best_in_play()
        if started is not None and started[1] > 0:
            return started[0]  # items already started complete before new ones open
        fresh = s.scalar(q["fresh"], {**at, "frontier": hints.frontier})
        if fresh is None:
            last = s.scalar(q["last"], at) or 0
            if last > hints.frontier:  # items past the frontier that other processes started: take them in
                hints.frontier = last
                started = best_in_play()
            return None if started is None else started[0]
        pick = fresh if started is None or fresh.position < started[0].position else started[0]
        hints.frontier = max(hints.frontier, pick.id)
        return pick

    def _pick_ordered(self, s: Any, project: Project, user_id: int, cutoff: float) -> Item | None:
        """next_task's pick in an ordered project, as plain queries over the project's items (a round has at most
        a few thousand). Among the items this user was never given, and counting an item as held by its
        judgments (skips included) and its assignments younger than the TTL, exactly as `_pick_item` does:

        1. a gold item when one is due: every annotator gets each gold item once. With the project's gold_every,
           at every gold_every-th task of theirs (gold_given * gold_every <= given) until they have answered
           all, so a round's budget anchors every annotator however few tasks each takes. Otherwise spread evenly
           through their tasks: due while the user's gold share after this task would stay below the project's
           (gold_given * items < (given + 1) * gold_items). Either way the first task is gold, which gives
           annotator reliability an anchor from the start;
        2. else a started item still open (held by fewer than its annotator count, its own or the project's), the
           most-held first, so overlap items complete before new ones open;
        3. else a fresh item (held by nobody): highest priority first, items without one last, ties by position;
        4. else any gold item left for this user, though not yet due.

        Within each group ties go by priority, then position. A priority changes only which fresh item goes out
        next: started items are finished first whatever their priority."""
        need = func.coalesce(Item.annotators, project.annotators_per_item)
        held = (select(func.count()).select_from(Assignment)
                .where(Assignment.item_id == Item.id,
                       or_(Assignment.completed_at.is_not(None), Assignment.created_at > cutoff))
                .correlate(Item).scalar_subquery())
        is_gold = exists().where(Gold.item_id == Item.id)
        mine = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user_id)
        by_priority = (Item.priority.is_(None), Item.priority.desc(), Item.position)  # None last, on any database
        open_to_me = select(Item).where(Item.project_id == project.id, ~mine)
        gold = open_to_me.where(is_gold).order_by(*by_priority).limit(1)

        items, gold_items = s.execute(select(func.count(Item.id), func.count(Gold.item_id)).select_from(Item)
                                      .outerjoin(Gold, Gold.item_id == Item.id)
                                      .where(Item.project_id == project.id)).one()
        if gold_items:
            given, gold_given = s.execute(
                select(func.count(Assignment.id), func.count(Gold.item_id)).select_from(Assignment)
                .join(Item, Item.id == Assignment.item_id)
                .outerjoin(Gold, Gold.item_id == Item.id)
                .where(Assignment.user_id == user_id, Item.project_id == project.id)).one()
            due = (gold_given * project.gold_every <= given if project.gold_every
                   else gold_given * items < (given + 1) * gold_items)
            if due and (pick := s.scalar(gold)) is not None:
                return pick
        started = s.scalar(open_to_me.where(~is_gold, held > 0, held < need)
                           .order_by(held.desc(), *by_priority).limit(1))
        if started is not None:
            return started
        fresh = s.scalar(open_to_me.where(~is_gold, held == 0).order_by(*by_priority).limit(1))
        if fresh is not None:
            return fresh
        return s.scalar(gold) if gold_items else None

    def set_priorities(self, project_id: int, priorities: Mapping[int, float]) -> int:
        """Set the priority of items of the project ({item id: priority}; higher goes out first) and order its
        queue by priority from now on; returns how many items were updated. Items already started are finished
        first whatever their priority: a priority decides only which fresh item goes out next. How a rounds loop
        re-orders the queue as labels arrive (e.g. the items whose label is most uncertain first)."""
        project = self.project(project_id)
        updates = []
        for item_id, priority in priorities.items():
            if isinstance(item_id, bool) or not isinstance(item_id, int) or not 0 < item_id <= MAX_ID:
                raise FeedbackError(f"item id {item_id!r} is not an item id; use the ids next_task and judged_items "
                                    "report.")
            _check_priority(priority, f"item {item_id}")
            updates.append({"id": item_id, "priority": float(priority)})
        if not updates:
            return 0
        with self.store.session() as s, s.begin():
            ids = [u["id"] for u in updates]
            found: set[int] = set()
            for start in range(0, len(ids), 500):  # well under any database's bound-parameter limit
                found.update(s.scalars(select(Item.id).where(Item.project_id == project.id,
                                                             Item.id.in_(ids[start : start + 500]))))
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"item {missing[0]} is not in project {project.name!r}"
                               f"{f' (nor are {len(missing) - 1} more)' if len(missing) > 1 else ''}; set "
                               "priorities only of that project's items.")
            s.execute(update(Item), updates)  # one UPDATE per row, by primary key
            s.execute(update(Project).where(Project.id == project.id).values(ordered=True))
        return len(updates)

    def task(self, user_id: int, assignment_id: int) -> Task:
        """An assignment of this user (Forbidden for someone else's)."""
        with self.store.session() as s:
            a = s.get(Assignment, assignment_id) if abs(assignment_id) <= MAX_ID else None
            if a is None:
                raise NotFound(f"assignment {assignment_id} does not exist.")
            if a.user_id != user_id:
                raise Forbidden("this task belongs to another annotator.")
            item = s.get(Item, a.item_id)
            project = s.get(Project, item.project_id)
            return Task(a.id, item.id, _project_info(project), item.prompt, [r["text"] for r in item.responses],
                        list(a.display_order))

    # --------------------------------------------------------------------------------------------- submit
    def submit(self, user_id: int, assignment_id: int, submission_id: str, *, outcome: str | None = None,
               strength: str | None = None, ranking: Sequence[Sequence[int]] | None = None,
               criteria: Mapping[str, Verdict] | None = None, scores: Sequence[Mapping[str, int]] | None = None,
               flags: Sequence[str] = (), rationale: str = "", time_spent_ms: int | None = None) -> Ack:
        """Record a judgment. Idempotent on submission_id: a retry of a stored submission returns its Ack with
        duplicate=True and writes nothing. Pairwise: outcome A/B (with a strength), tie, both_bad or skip.
        Ranking: tiers of response indices best first, or outcome skip. Rubric (a pairwise project with
        criteria): a Verdict for every criterion, or outcome skip. Attributes: scores[i] = {attribute: 0-4} for
        every attribute of each response i (item order), or outcome skip."""
        if not isinstance(submission_id, str) or not _SUBMISSION_RE.match(submission_id):
            raise FeedbackError("submission_id must be 8-64 letters, digits, '-' or '_' (a UUID works).")
        bad_flags = sorted(set(flags) - set(FLAGS))
        if bad_flags:
            raise FeedbackError(f"unknown flag(s) {bad_flags}; use any of {', '.join(FLAGS)}.")
        if len(rationale) > MAX_RATIONALE:
            raise FeedbackError(f"the rationale is {len(rationale)} characters; keep it under {MAX_RATIONALE}.")
        if time_spent_ms is not None and not 0 <= time_spent_ms <= MAX_ID:
            raise FeedbackError(f"time_spent_ms must be between 0 and {MAX_ID}, got {time_spent_ms}.")
        if abs(assignment_id) > MAX_ID:
            raise NotFound(f"assignment {assignment_id} does not exist.")
        try:
            with self.store.session() as s, s.begin():
                existing = s.scalar(_queue_statements()["submission"], {"submission": submission_id})
                if existing is not None:
                    if existing.user_id != user_id:
                        raise Forbidden("this submission id belongs to another annotator.")
                    return Ack(existing.id, duplicate=True)
                a = s.get(Assignment, assignment_id)
                if a is None:
                    raise NotFound(f"assignment {assignment_id} does not exist.")
                if a.user_id != user_id:
                    raise Forbidden("this task belongs to another annotator.")
                if a.completed_at is not None:
                    raise Conflict("this task was already judged (with another submission id).")
                item = s.get(Item, a.item_id)
                project = _project_info(s.get(Project, item.project_id))
                answer = _validate_answer(project, len(item.responses), outcome, strength, ranking, criteria,
                                          scores)
                j = Judgment(submission_id=submission_id, assignment_id=a.id, item_id=item.id, user_id=user_id,
                             **answer, flags=sorted(set(flags)), rationale=rationale, time_spent_ms=time_spent_ms,
                             display_order=list(a.display_order))
                s.add(j)
                a.completed_at = now()
                s.flush()
                return Ack(j.id, duplicate=False)
        except IntegrityError:
            # another connection stored the same submission id first (possible on PostgreSQL, whose
            # transactions do not serialise like SQLite's BEGIN IMMEDIATE): that one is the stored copy
            with self.store.session() as s:
                existing = s.scalar(select(Judgment).where(Judgment.submission_id == submission_id))
            if existing is None or existing.user_id != user_id:
                raise Conflict("this task was already judged (with another submission id).") from None
            return Ack(existing.id, duplicate=True)

    # -------------------------------------------------------------------------------------------- reports
    def _judgments(self, project_id: int) -> list[tuple[Judgment, str, bool]]:
        with self.store.session() as s:
            rows = s.execute(
                select(Judgment, User.name, Gold.item_id).join(Item, Item.id == Judgment.item_id)
                .join(User, User.id == Judgment.user_id).outerjoin(Gold, Gold.item_id == Item.id)
                .where(Item.project_id == project_id).order_by(Judgment.id)).all()
        return [(j, name, gold is not None) for j, name, gold in rows]

    def user_progress(self, user_id: int, project_id: int) -> tuple[int, int]:
        """(items this user judged, items still available to them) in the project."""
        with self.store.session() as s:
            done = s.scalar(select(func.count()).select_from(Assignment).join(Item, Item.id == Assignment.item_id)
                            .where(Assignment.user_id == user_id, Item.project_id == project_id,
                                   Assignment.completed_at.is_not(None)))
            total = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project_id))
        return done, total - done

    def progress(self, project_id: int) -> Progress:
        """Items, judgments and per-annotator counts of a project; `labels` is what a rounds loop waits on."""
        project = self.project(project_id)
        k = project.annotators_per_item
        with self.store.session() as s:
            # the items with their own annotator count (ordered projects only); every other item asks for k
            need: dict[int, int] = dict(s.execute(select(Item.id, Item.annotators).where(
                Item.project_id == project_id, Item.annotators.is_not(None))).all())
            slots = s.scalar(select(func.coalesce(func.sum(func.coalesce(Item.annotators, k)), 0))
                             .where(Item.project_id == project_id, ~exists().where(Gold.item_id == Item.id)))
            items = s.scalar(select(func.count()).select_from(Item).where(Item.project_id == project_id))
            gold_items = s.scalar(select(func.count()).select_from(Gold).join(Item, Item.id == Gold.item_id)
                                  .where(Item.project_id == project_id))
            golds = {g.item_id: g for g in s.scalars(
                select(Gold).join(Item, Item.id == Gold.item_id).where(Item.project_id == project_id))}
        per: dict[str, AnnotatorProgress] = {}
        seconds: dict[str, list[float]] = defaultdict(list)
        labelled: dict[int, int] = defaultdict(int)
        outcomes = {o: 0 for o in VERDICTS} if project.mode == "pairwise" and not project.criteria else {}
        skips = gold_labels = 0
        judgments = self._judgments(project_id)
        for j, name, is_gold in judgments:
            p = per.setdefault(name, AnnotatorProgress(name))
            p.judgments += 1
            p.skips += j.outcome == "skip"
            p.flagged += bool(j.flags)
            skips += j.outcome == "skip"
            if j.time_spent_ms is not None:
                seconds[name].append(j.time_spent_ms / 1000)
            if is_gold:
                gold_labels += j.outcome != "skip"
                label = label_of(project.mode, j.outcome, j.ranking)
                if label is not None:
                    g = golds[j.item_id]
                    p.gold_seen += 1
                    p.gold_correct += label == (g.outcome if project.mode == "pairwise" else (g.top,))
            elif j.outcome != "skip":
                labelled[j.item_id] += 1
                if j.outcome in outcomes:
                    outcomes[j.outcome] += 1
        for name, values in seconds.items():
            per[name].median_seconds = statistics.median(values)
        complete = sum(n >= need.get(i, k) for i, n in labelled.items())
        return Progress(items, gold_items, len(judgments), complete, sorted(per.values(), key=lambda p: p.name),
                        labels=sum(labelled.values()), skips=skips, gold_labels=gold_labels, slots=slots,
                        outcomes=outcomes)

    def agreement(self, project_id: int, min_shared: int = 5) -> Agreement:
        """Agreement on non-gold items (gold items measure accuracy instead): percent agreement and
        Krippendorff's alpha over everyone, Cohen's kappa per annotator pair with min_shared shared items. A
        project answered per criterion has no overall label: `agreement_by_criterion` reports it."""
        project = self.project(project_id)
        if project.criteria:
            raise FeedbackError(f"project {project.name!r} is labelled per "
                                f"{'attribute' if project.mode == 'attributes' else 'criterion'}; ask for "
                                "agreement_by_criterion.")
        by_item: dict[Any, dict[str, Any]] = defaultdict(dict)
        for j, name, is_gold in self._judgments(project_id):
            label = label_of(project.mode, j.outcome, j.ranking)
            if not is_gold and label is not None:
                by_item[j.item_id][name] = label
        return _agreement(by_item, min_shared, krippendorff_alpha_nominal,
                          "outcome (A/B/tie/both_bad)" if project.mode == "pairwise" else "response ranked first")

    def agreement_by_criterion(self, project_id: int, min_shared: int = 5) -> dict[str, Agreement]:
        """Agreement per criterion, in the project's criterion order; {} for a project without criteria.

        Rubric: each criterion's verdicts (A/B/tie/both_bad) as nominal labels of the item, exactly as
        `agreement` compares whole-item outcomes. Attributes: each attribute's 0-4 scores with the interval alpha
        (a 3 against a 4 is a small disagreement, a 0 against a 4 a large one), one unit per (item, response);
        percent agreement counts exact matches, and no kappa is given (Cohen's kappa treats scores as
        unordered)."""
        project = self.project(project_id)
        units: dict[str, dict[Any, dict[str, Any]]] = {c: defaultdict(dict) for c in project.criteria}
        for j, name, is_gold in self._judgments(project_id):
            if is_gold or j.outcome == "skip":
                continue
            if project.mode == "attributes" and j.scores is not None:
                for i, scored in enumerate(j.scores):
                    for attribute, value in scored.items():
                        units[attribute][(j.item_id, i)][name] = value
            elif j.rubric is not None:
                for criterion, verdict in j.rubric.items():
                    units[criterion][j.item_id][name] = verdict["outcome"]
        if project.mode == "attributes":
            return {a: _agreement(by_unit, None, krippendorff_alpha_interval, f"{a} score (0-4)", "interval")
                    for a, by_unit in units.items()}
        return {c: _agreement(by_unit, min_shared, krippendorff_alpha_nominal, f"{c} outcome (A/B/tie/both_bad)")
                for c, by_unit in units.items()}

    def reliability(self, project_ids: Sequence[int | str], criterion: str | None = None, *,
                    prior: tuple[float, float] = PRIOR, min_informative: int = MIN_INFORMATIVE,
                    random_below: float = RANDOM_BELOW, flag_probability: float = FLAG_PROBABILITY,
                    ) -> ReliabilityReport:
        """Annotator reliability over the pairwise judgments of one or more projects (a run's rounds pooled, so
        an annotator is one person across rounds): the one-coin Dawid & Skene fit of `reliability.dawid_skene`,
        with each annotator's accuracy, flag and suspicion and each A/B judgment's posterior. A rubric project is
        fit one criterion at a time (pass criterion); ranking and attribute projects have no A/B judgments to
        fit. The settings are dawid_skene's (its module documents the defaults)."""
        if isinstance(project_ids, (int, str)) or not project_ids:
            raise FeedbackError(f"reliability takes a non-empty list of project ids, got {project_ids!r}; pass "
                                "[project_id] for one project.")
        try:
            check_settings(prior, min_informative, random_below, flag_probability)
        except UserError as exc:
            raise FeedbackError(str(exc)) from None
        projects = list({p.id: p for p in map(self.project, project_ids)}.values())  # each project once
        for project in projects:
            if project.mode != "pairwise":
                raise FeedbackError(f"project {project.name!r} is a {project.mode} project; annotator reliability "
                                    "is estimated from pairwise (A/B) judgments only.")
            if project.rubric and criterion is None:
                raise FeedbackError(f"project {project.name!r} is answered per criterion; pass criterion, one of "
                                    f"{', '.join(project.criteria)}.")
            if project.rubric and criterion not in project.criteria:
                raise FeedbackError(f"criterion {criterion!r} is not one of project {project.name!r}'s criteria "
                                    f"({', '.join(project.criteria)}); pass one of them.")
            if not project.rubric and criterion is not None:
                raise FeedbackError(f"project {project.name!r} has no criteria, so there is no criterion "
                                    f"{criterion!r} to fit; drop criterion.")
        with self.store.session() as s:
            rows = s.execute(
                select(Judgment.item_id, User.name, Judgment.outcome, Judgment.rubric, Gold.outcome)
                .join(Item, Item.id == Judgment.item_id).join(User, User.id == Judgment.user_id)
                .outerjoin(Gold, Gold.item_id == Item.id)
                .where(Item.project_id.in_([p.id for p in projects])).order_by(Judgment.id)).all()
        labels = [Label(item_id, name, rubric[criterion]["outcome"] if criterion and rubric else outcome, gold)
                  for item_id, name, outcome, rubric, gold in rows]
        return dawid_skene(labels, criterion=criterion, prior=prior, min_informative=min_informative,
                           random_below=random_below, flag_probability=flag_probability)

    def flagged(self, project_id: int) -> list[Flagged]:
        with self.store.session() as s:
            rows = s.execute(
                select(Judgment, User.name, Item.prompt).join(Item, Item.id == Judgment.item_id)
                .join(User, User.id == Judgment.user_id)
                .where(Item.project_id == project_id).order_by(Judgment.id)).all()
        return [Flagged(j.item_id, prompt, name, list(j.flags), j.rationale) for j, name, prompt in rows if j.flags]

    def judged_items(self, project_id: int) -> list[dict[str, Any]]:
        """Every judgment with its item, for export: item prompt/responses/sources, annotator, gold flag, and the
        answer (outcome, strength, ranking; rubric {criterion: {outcome, strength}}; scores per response)."""
        with self.store.session() as s:
            rows = s.execute(
                select(Judgment, Item, User.name, Gold.item_id).join(Item, Item.id == Judgment.item_id)
                .join(User, User.id == Judgment.user_id).outerjoin(Gold, Gold.item_id == Item.id)
                .where(Item.project_id == project_id).order_by(Item.position, Judgment.id)).all()
        return [{"item_id": item.id, "judgment_id": j.id, "prompt": item.prompt, "responses": [r["text"] for r in item.responses],
                 "sources": [r.get("source", "") for r in item.responses], "annotator": name,
                 "gold": gold is not None, "outcome": j.outcome, "strength": j.strength, "ranking": j.ranking,
                 "flags": list(j.flags), "rationale": j.rationale, "display_order": list(j.display_order),
                 "rubric": j.rubric, "scores": j.scores}
                for j, item, name, gold in rows]


@functools.lru_cache(maxsize=None)
def _dummy_hash_at(n: int) -> str:
    return hash_password(secrets.token_hex(16))


def _dummy_hash() -> str:
    return _dummy_hash_at(SCRYPT_N)


def _validate_answer(project: ProjectInfo, k: int, outcome: str | None, strength: str | None,
                     ranking: Sequence[Sequence[int]] | None, criteria: Mapping[str, Verdict] | None,
                     scores: Sequence[Mapping[str, int]] | None) -> dict[str, Any]:
    """The Judgment columns of a submitted answer, checked against the project's kind; FeedbackError names the
    first problem. A skip carries nothing else."""
    kind = "rubric" if project.rubric else project.mode
    if criteria is not None and kind != "rubric":
        raise FeedbackError(f"project {project.name!r} is not a rubric project, so a judgment takes no "
                            "per-criterion verdicts; send "
                            f"{'scores' if kind == 'attributes' else 'an outcome or ranking'}.")
    if scores is not None and kind != "attributes":
        raise FeedbackError(f"project {project.name!r} is not an attribute project, so a judgment takes no "
                            "scores; send an outcome or ranking.")
    if kind in ("pairwise", "ranking"):
        outcome, strength, tiers = _validate(project.mode, k, outcome, strength, ranking)
        return dict(outcome=outcome, strength=strength, ranking=tiers)
    if outcome == "skip":
        if criteria is not None or scores is not None or strength is not None or ranking is not None:
            raise FeedbackError("a skipped task takes no answers; send outcome skip alone.")
        return dict(outcome="skip", strength=None, ranking=None)
    if outcome is not None or strength is not None or ranking is not None:
        what = "a verdict per criterion" if kind == "rubric" else "scores per attribute"
        raise FeedbackError(f"project {project.name!r} takes {what} (or outcome skip), not an overall outcome, "
                            "strength or ranking.")
    if kind == "rubric":
        return dict(outcome=None, strength=None, ranking=None, rubric=_validate_rubric(project, criteria))
    return dict(outcome=None, strength=None, ranking=None, scores=_validate_scores(project, k, scores))


def _validate_rubric(project: ProjectInfo, criteria: Mapping[str, Verdict] | None) -> dict[str, dict[str, Any]]:
    names = ", ".join(project.criteria)
    if not criteria:
        raise FeedbackError(f"project {project.name!r} is answered per criterion ({names}); answer every criterion "
                            "or skip the task.")
    unknown = sorted(set(criteria) - set(project.criteria), key=str)
    if unknown:
        raise FeedbackError(f"criterion {unknown[0]!r} is not one of project {project.name!r}'s criteria ({names}); "
                            "answer only those.")
    missing = [c for c in project.criteria if c not in criteria]
    if missing:
        raise FeedbackError(f"criterion {missing[0]!r} is not answered; answer every criterion ({names}) or skip "
                            "the task.")
    out = {}
    for name in project.criteria:  # stored in the project's order
        verdict = criteria[name]
        if not isinstance(verdict, Verdict):
            raise FeedbackError(f"criterion {name!r}: expected a Verdict(outcome, strength), got "
                                f"{type(verdict).__name__}.")
        if verdict.outcome not in VERDICTS:
            raise FeedbackError(f"criterion {name!r}: outcome {verdict.outcome!r} is unknown; use one of "
                                f"{', '.join(VERDICTS)}.")
        if verdict.strength is not None:
            if verdict.strength not in STRENGTHS:
                raise FeedbackError(f"criterion {name!r}: strength {verdict.strength!r} is unknown; use one of "
                                    f"{', '.join(STRENGTHS)}.")
            if verdict.outcome not in ("A", "B"):
                raise FeedbackError(f"criterion {name!r}: a {verdict.outcome} has no direction, so it takes no "
                                    "strength; clear the strength or pick A or B.")
        # strength is optional per criterion: a rubric asks for several verdicts per item, and an A/B without
        # one exports as plain Bradley-Terry (margin 0.0), as a strength-less judgment does today
        out[name] = {"outcome": verdict.outcome, "strength": verdict.strength}
    return out


def _validate_scores(project: ProjectInfo, k: int, scores: Sequence[Mapping[str, int]] | None
                     ) -> list[dict[str, int]]:
    names = ", ".join(project.criteria)
    if not scores:
        raise FeedbackError(f"project {project.name!r} scores each response 0-4 on {names}; score every response "
                            "or skip the task.")
    if isinstance(scores, Mapping) or len(scores) != k:
        raise FeedbackError(f"scores must be a list with one entry per response ({k}), in item order.")
    out = []
    for i, scored in enumerate(scores):
        if not isinstance(scored, Mapping):
            raise FeedbackError(f"scores of response index {i} must map attribute names to 0-4, got "
                                f"{type(scored).__name__}.")
        unknown = sorted(set(scored) - set(project.criteria), key=str)
        if unknown:
            raise FeedbackError(f"attribute {unknown[0]!r} is not one of project {project.name!r}'s attributes "
                                f"({names}); score only those.")
        row = {}
        for name in project.criteria:
            if name not in scored:
                raise FeedbackError(f"response index {i} has no {name} score; score every attribute ({names}) of "
                                    "every response, or skip the task.")
            value = scored[name]
            if isinstance(value, bool) or not isinstance(value, int) or value not in LIKERT:
                raise FeedbackError(f"response index {i}: the {name} score must be an integer from {LIKERT[0]} "
                                    f"to {LIKERT[-1]}, got {value!r}.")
            row[name] = value
        out.append(row)
    return out


def _validate(mode: str, k: int, outcome: str | None, strength: str | None,
              ranking: Sequence[Sequence[int]] | None) -> tuple[str | None, str | None, list[list[int]] | None]:
    if strength is not None and strength not in STRENGTHS:
        raise FeedbackError(f"strength {strength!r} is unknown; use one of {', '.join(STRENGTHS)}.")
    if outcome == "skip":
        return "skip", None, None
    if mode == "pairwise":
        if ranking is not None:
            raise FeedbackError("a pairwise task takes an outcome, not a ranking.")
        if outcome not in OUTCOMES:
            raise FeedbackError(f"outcome {outcome!r} is unknown; use one of {', '.join(OUTCOMES)}.")
        if outcome in ("A", "B"):
            if strength is None:
                raise FeedbackError("say how much better the chosen response is (a strength level).")
            return outcome, strength, None
        return outcome, None, None  # a tie or "both bad" has no direction, so no strength
    if outcome is not None:
        raise FeedbackError(f"a ranking task takes a ranking (or outcome skip), not outcome {outcome!r}.")
    if not ranking:
        raise FeedbackError("rank the responses (best first) or skip the task.")
    tiers = []
    for tier in ranking:
        if not tier or any(isinstance(i, bool) or not isinstance(i, int) for i in tier):
            raise FeedbackError(f"ranking tiers must be non-empty lists of response indices, got {list(ranking)}.")
        tiers.append(sorted(tier))
    if sorted(i for t in tiers for i in t) != list(range(k)):
        raise FeedbackError(f"the ranking {tiers} must place each of the {k} responses exactly once.")
    if len(tiers) < 2:
        raise FeedbackError("the ranking ties every response; rank at least two levels or skip.")
    return None, strength, tiers
