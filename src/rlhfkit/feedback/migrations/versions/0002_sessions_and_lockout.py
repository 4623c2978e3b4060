"""Server-side sessions, per-name login failures (lockout with back-off) and deactivatable users.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # existing users stay able to log in: the column arrives filled with true
    with op.batch_alter_table("users") as batch:
        # a literal default: an SQL expression (sa.true()) makes alembic rebuild the table on SQLite, and the rebuild's DROP
        # fails under enforced foreign keys once any session or assignment points at a user
        batch.add_column(sa.Column("active", sa.Boolean, nullable=False, server_default="1"))
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_table(
        "login_failures",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure_at", sa.Float, nullable=False),
        sa.Column("locked_until", sa.Float, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("login_failures")
    op.drop_index("ix_sessions_user_id", "sessions")
    op.drop_table("sessions")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("active")
