"""forget_users: the users a `forget` asked a running daemon to forget

Revision ID: 0006_forget
Revises: 0005
Create Date: 2026-12-02

- ``forget_users``: one row per user of an ``admin_requests`` row of kind
  ``forget`` (or ``forget+gleap``). The daemon deletes the row of each user it
  forgot in the transaction that deletes their store rows; the rows left name
  the users it could not forget (Gleap's outcome unknown), for the asking
  command, which deletes them once it has read them. Deleting the request
  (``prune``) deletes its rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_forget"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "forget_users",
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["admin_requests.id"],
            name="fk_forget_users_request_id_admin_requests",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", "user_id", name="pk_forget_users"),
    )


def downgrade() -> None:
    op.drop_table("forget_users")
