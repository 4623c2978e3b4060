"""Items and users shared by the feedback tests."""

from rlhfkit.feedback.service import ItemSpec


def arith_items(n: int, start: int = 0) -> list[ItemSpec]:
    """Pairs whose right answer is response 0."""
    out = []
    for i in range(start, start + n):
        a, b = i % 9 + 1, (i * 7) % 9 + 1
        out.append(ItemSpec(prompt=f"what is {a} plus {b} ?", responses=[f"{a} plus {b} is {a + b} , ada !",
                                                                         f"{a} plus {b} is {a + b + 1} ."],
                            sources=["good-model", "bad-model"]))
    return out


def old_database(path, revision: str, prompts=("q1 ?", "q2 ?"), judged: bool = True) -> None:
    """A feedback database at an earlier schema `revision`, as that release left it: user 'ann', pairwise project
    'old' with an item per prompt (response 0 "<prompt> yes .", response 1 "<prompt> no ."), and ann's task on the
    first item, judged A / better when `judged` (else left open). Foreign keys are on, as the store runs them."""
    import json

    from alembic import command
    from sqlalchemy import create_engine, event

    from rlhfkit.feedback.store import _alembic_config

    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", lambda c, _r: c.execute("PRAGMA foreign_keys=ON"))
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)
        run = conn.exec_driver_sql
        active = "" if revision == "0001" else ", active"  # users.active came with 0002
        run(f"insert into users (name, role, password_hash, created_at{active}) values ('ann', 'annotator', null, 0"
            f"{', 1' if active else ''})")
        run("insert into projects (name, instructions, mode, responses_per_item, annotators_per_item, created_at) "
            "values ('old', '', 'pairwise', 2, 1, 0)")
        for pos, prompt in enumerate(prompts):
            responses = json.dumps([{"text": f"{prompt} yes .", "source": "g"}, {"text": f"{prompt} no .", "source": "b"}])
            run("insert into items (project_id, prompt, responses, position, created_at) values (1, ?, ?, ?, 0)",
                (prompt, responses, pos))
        run("insert into assignments (item_id, user_id, display_order, created_at, completed_at) "
            f"values (1, 1, '[1, 0]', 0, {1 if judged else 'null'})")
        if judged:
            run("insert into judgments (submission_id, assignment_id, item_id, user_id, outcome, strength, ranking, "
                "flags, rationale, time_spent_ms, display_order, created_at) values "
                "('old-submission', 1, 1, 1, 'A', 'better', null, '[]', '', 900, '[1, 0]', 0)")
    engine.dispose()


def upgraded_service(path):
    """Open the store at `path` (which upgrades it), check it reached the head revision with exactly the schema the
    models declare, and return a service on it."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import Base, head_revision, open_store

    store = open_store(str(path))
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("select version_num from alembic_version").scalar() == head_revision()
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    return FeedbackService(store)
