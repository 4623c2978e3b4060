"""Per-criterion labelling: a project's criteria (rubric) or attributes, and each judgment's per-criterion answers
or per-response attribute scores.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns: existing projects and judgments arrive with NULL, which is what "no criteria" means, so an
    # upgraded database behaves exactly as before
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("criteria", sa.JSON, nullable=True))
    with op.batch_alter_table("judgments") as batch:
        batch.add_column(sa.Column("rubric", sa.JSON, nullable=True))
        batch.add_column(sa.Column("scores", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("judgments") as batch:
        batch.drop_column("scores")
        batch.drop_column("rubric")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("criteria")
