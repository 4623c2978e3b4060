"""Gold items at every k-th task of an annotator: a project's gold_every (ordered queues).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable, no default: existing projects keep spreading their gold items over the whole project
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("gold_every", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("gold_every")
