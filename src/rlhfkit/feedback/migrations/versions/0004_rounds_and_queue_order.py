"""Human-in-the-loop rounds: a project's run and round number, and a queue ordered by item priority with a
per-item annotator count (overlap on a share of items, for annotator reliability).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns and ordered = false: an upgraded database's projects are outside any run and keep the
    # position-order queue, so they behave exactly as before. These must stay plain ALTER TABLE ADD COLUMNs on
    # SQLite: whatever makes batch mode copy the table instead (an index created inside the batch, a default
    # given as an SQL expression such as sa.false()) drops `projects`, which the items' foreign key refuses
    # once a project has items. The literal '0' reads as false on SQLite and PostgreSQL alike
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("run", sa.String(128), nullable=True))
        batch.add_column(sa.Column("round", sa.Integer, nullable=True))
        batch.add_column(sa.Column("ordered", sa.Boolean, nullable=False, server_default="0"))
    op.create_index("ix_projects_run", "projects", ["run"])
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("priority", sa.Float, nullable=True))
        batch.add_column(sa.Column("annotators", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("annotators")
        batch.drop_column("priority")
    op.drop_index("ix_projects_run", "projects")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("ordered")
        batch.drop_column("round")
        batch.drop_column("run")
