"""The judgments store: SQLAlchemy 2 models and `open_store(url)`, which applies the packaged alembic migrations.

SQLite (the default) runs in WAL mode and every transaction starts with BEGIN IMMEDIATE, so a writer takes the
write lock before it reads what it will change: two annotators asking for the last open slot of an item cannot
both get it, and no acknowledged write is lost to a "database is locked" upgrade failure. PostgreSQL works by
URL (`postgresql+psycopg://user@host/db`); there the unique constraints below do the same job.

The database holds password hashes and every judgment, so a SQLite file is created owner-only (0600); SQLite gives
its -wal and -shm files the database file's mode."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event, false, true,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from rlhfkit.errors import UserError

log = logging.getLogger(__name__)

ROLES = ("admin", "annotator")
MODES = ("pairwise", "ranking", "attributes")
"""attributes: each response of an item gets a Likert score per attribute (HelpSteer2's scheme), no comparison."""
VERDICTS = ("A", "B", "tie", "both_bad")
"""What a rubric project's annotator answers per criterion: OUTCOMES without skip (a skip skips the whole task)."""
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
"""An attribute project's default attributes: HelpSteer2's five (Wang et al. 2024, arXiv 2406.08673, section 2)."""
LIKERT = range(0, 5)
"""An attribute score: an integer 0-4, higher is more of it (HelpSteer2's scale)."""
OUTCOMES = ("A", "B", "tie", "both_bad", "skip")
"""Pairwise outcomes. "A" and "B" name responses 0 and 1 of the item, whichever side they were shown on."""
FLAGS = ("harmful", "inaccurate", "off_topic", "broken")
"""Harm and quality flags an annotator may raise on an item."""


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    password_hash: Mapped[str | None] = mapped_column(String(256), nullable=True)
    """None for simulated annotators: they submit through the service layer and cannot log in."""
    created_at: Mapped[float] = mapped_column(Float, nullable=False, default=now)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True, server_default=true())
    """False for a deactivated account: it cannot log in and its sessions stop working."""


class AuthSession(Base):
    """A login: the cookie holds a random token, this table only its SHA-256, so reading the database does not
    let anyone act as a logged-in user. Logout and admins revoke rows; expired and revoked rows never work."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """SHA-256 (hex) of the session token."""
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    created_at: Mapped[float] = mapped_column(Float, nullable=False, default=now)
    last_seen_at: Mapped[float] = mapped_column(Float, nullable=False, default=now)
    """Updated at most once a minute, so a page view does not always write."""
    expires_at: Mapped[float] = mapped_column(Float, nullable=False)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class LoginFailures(Base):
    """Consecutive failed logins per name, with the lock they earned. Keyed by the name tried, not by user, so
    unknown names lock exactly like real ones and the lock reveals no account; a success or an admin's unlock
    deletes the row, and rows of names left alone for a day are pruned."""

    __tablename__ = "login_failures"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, nullable=False)
    last_failure_at: Mapped[float] = mapped_column(Float, nullable=False)
    locked_until: Mapped[float | None] = mapped_column(Float, nullable=True)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    instructions: Mapped[str] = mapped_column(Text, nullable=False, default="")
    mode: Mapped[str] = mapped_column(String(16), nullable=False)
    responses_per_item: Mapped[int] = mapped_column(Integer, nullable=False)
    annotators_per_item: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False, default=now)
    criteria: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    """Pairwise rubric projects: the criteria answered one by one (["helpfulness", "harmlessness", "honesty"]);
    attribute projects: the attributes scored. None for a plain pairwise or ranking project."""
    run: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    """The human-in-the-loop rounds run this project is a round of; None for a project outside any run."""
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Its round number in that run, 1-based; None outside a run."""
    ordered: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    """True once any item has a priority or its own annotator count: the queue then picks by priority
    (FeedbackService._pick_ordered) instead of by position along hints (_pick_item)."""
    gold_every: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Ordered projects: every gold_every-th task of an annotator is a gold item until they have answered them all
    (a labelling budget smaller than the project then still anchors every annotator's reliability); None spreads
    the gold items evenly over the whole project."""


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), nullable=False, index=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    responses: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    """[{"text": ..., "source": model or file id}, ...]; index i is response i ("A" = 0, "B" = 1)."""
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False, default=now)
    priority: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Queue order of an ordered project: fresh items go out highest priority first; None sorts after every
    prioritised item."""
    annotators: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """How many annotators judge this item, overriding the project's annotators_per_item; None: the project's."""


class Gold(Base):
    """The known answer of a gold item (served to every annotator, scored, not exported by default)."""

    __tablename__ = "gold"
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """Pairwise: the right outcome (A, B, tie or both_bad)."""
    top: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Ranking: the index of the response that must be ranked first."""


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_assignment_item_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), nullable=False, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    display_order: Mapped[list[int]] = mapped_column(JSON, nullable=False)
    """Response indices in the order shown (left to right, top to bottom), drawn at random when assigned."""
    created_at: Mapped[float] = mapped_column(Float, nullable=False, default=now)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Judgment(Base):
    __tablename__ = "judgments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    """Chosen by the client; a retried submission with the same id is acknowledged, not stored twice."""
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id"), unique=True, nullable=False)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), nullable=False, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """Pairwise outcome, or "skip" in either mode; None for a ranking."""
    strength: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ranking: Mapped[list[list[int]] | None] = mapped_column(JSON, nullable=True)
    """Tiers of response indices, best first: [[2], [0, 1]] = 2 > {0, 1}."""
    flags: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    rationale: Mapped[str] = mapped_column(Text, nullable=False, default="")
    time_spent_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    display_order: Mapped[list[int]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[float] = mapped_column(Float, nullable=False, default=now)
    rubric: Mapped[dict[str, dict[str, str | None]] | None] = mapped_column(JSON, nullable=True)
    """A rubric project's answers, {criterion: {"outcome": A/B/tie/both_bad, "strength": level or null}}, one per
    criterion of the project; None for skips and for projects without criteria."""
    scores: Mapped[list[dict[str, int]] | None] = mapped_column(JSON, nullable=True)
    """An attribute project's scores, [{attribute: 0-4, ...} for response 0, for response 1, ...] (item order, not
    display order); None for skips and for other projects."""


# ------------------------------------------------------------------------------------------------ opening
def database_url(db: str) -> str:
    """A SQLAlchemy URL as given, or a file path turned into a SQLite URL."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _enter_wal(cur: Any, wait: float = 60.0) -> None:
    """Put the database in write-ahead-log mode (persistent, so only a new file's first opener changes it).

    Switching a fresh file to WAL needs its exclusive lock. When several connections open a new database at once
    (the loop and a person's labelling pages), each holds a shared lock while asking for it, and SQLite answers one
    of them SQLITE_BUSY at once instead of calling the busy handler (its deadlock avoidance). So retry, briefly
    sleeping, for as long as the busy timeout would have waited."""
    deadline = time.monotonic() + wait
    pause = 0.005
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)


def _sqlite_engine(url: str) -> Engine:
    # check_same_thread off: the web app's worker threads share the pool; timeout waits for the write lock
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (SQLAlchemy's documented pysqlite recipe)
        cur = dbapi_conn.cursor()
        _enter_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable against process crashes, fast commits
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        # take the write lock up front: a deferred transaction that reads, then writes, can fail with
        # SQLITE_BUSY after its read, which is exactly the lost-write case under concurrency
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@dataclass
class Store:
    """An engine plus a session factory; use `with store.session() as s, s.begin(): ...`."""

    url: str
    engine: Engine
    Session: sessionmaker

    def session(self) -> Session:
        return self.Session()

    def close(self) -> None:
        self.engine.dispose()


def _alembic_config(connection: Any = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest packaged revision (a no-op when it is there already)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    with engine.begin() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in {r.revision for r in script.walk_revisions()}:
            raise UserError(f"the feedback database {engine.url.render_as_string(hide_password=True)} is at schema "
                            f"revision {current}, which this rlhfkit does not know; upgrade rlhfkit to open it.")
        if current != script.get_current_head():
            command.upgrade(_alembic_config(conn), "head")


def _private_sqlite_file(path: Path) -> None:
    """Create the database file owner-only before SQLite opens it; tighten one an older rlhfkit left readable.

    os.open's mode, not the umask: the umask is process-wide, so changing it would race with files other threads
    create. SQLite creates -wal and -shm with the database file's mode (findCreateFileMode in os_unix.c), so
    they are 0600 too."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    for p in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        try:
            mode = os.stat(p).st_mode
            if stat.S_ISREG(mode) and mode & 0o077:
                os.chmod(p, 0o600)
                log.warning("%s was readable by other users; made it owner-only (0600): it holds password hashes "
                            "and judgments", p)
        except FileNotFoundError:
            continue
        except OSError as exc:  # someone else's file: say so, and open it anyway
            log.warning("%s is readable by other users and cannot be made owner-only (%s)", p, exc)


def open_store(db: str) -> Store:
    """Open (creating if needed) the feedback database at a file path or SQLAlchemy URL and migrate it."""
    url = database_url(db)
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:" and not path.startswith("file:"):
            parent = Path(path).parent
            if not parent.is_dir():
                raise UserError(f"the directory {parent} for the feedback database does not exist; create it or "
                                "pass another --db.")
            _private_sqlite_file(Path(path))
        engine = _sqlite_engine(url)
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except Exception as exc:  # a missing driver or a malformed URL
            raise UserError(f"cannot use the database URL {url!r} ({exc}); check the URL and install its driver "
                            "(e.g. psycopg for postgresql+psycopg://).") from None
    try:
        upgrade(engine)
    except DatabaseError as exc:  # a file that is not SQLite ("file is not a database"), or a server refusing us
        engine.dispose()
        first = str(exc.orig).splitlines()[0] if getattr(exc, "orig", None) else type(exc).__name__
        raise UserError(f"--db {db} is not a usable feedback database ({first}); pass a new file name or an "
                        "existing rlhfkit feedback database.") from None
    return Store(url, engine, sessionmaker(engine, expire_on_commit=False))
