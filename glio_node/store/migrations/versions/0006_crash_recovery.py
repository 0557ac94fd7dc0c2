"""Crash recovery: which process a node row is, and which node claimed a delivery.

- ``node.pid``, ``node.process_key``: the process behind a node row (its PID, and the boot, PID
  namespace and start time that make the PID unambiguous), so a node on the same host can tell
  at once that the process is gone and take its jobs back without waiting for the lease;
- ``delivery.claimed_by``: the node that claimed a pending delivery, so the deliveries of a gone
  node are sendable at once too.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('node', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('process_key', sa.String(length=128), nullable=True))
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_column('claimed_by')
    with op.batch_alter_table('node', schema=None) as batch_op:
        batch_op.drop_column('process_key')
        batch_op.drop_column('pid')
