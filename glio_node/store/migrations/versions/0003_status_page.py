"""Status page: node heartbeats, job progress, operator switches, accession number on series.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

- ``node``: one row per ``glio-node`` process with its heartbeat (several nodes on PostgreSQL);
- ``job.tiles_done / tiles_total / progress_at``: progress of the running attempt, for % and ETA;
- ``control``: operator switches shared by all nodes (``intake_paused``);
- ``series.accession_number``: for the status page's audit search (never logged).
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'node',
        sa.Column('owner', sa.String(length=128), nullable=False),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('device', sa.String(length=64), nullable=True),
        sa.Column('bundle_name', sa.String(length=128), nullable=True),
        sa.Column('bundle_version', sa.String(length=64), nullable=True),
        sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('owner', name=op.f('pk_node')),
    )
    op.create_index(op.f('ix_node_heartbeat_at'), 'node', ['heartbeat_at'], unique=False)
    op.create_table(
        'control',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('value', sa.String(length=256), nullable=False),
        sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_control')),
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tiles_done', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tiles_total', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('progress_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('accession_number', sa.String(length=16), nullable=True))
        batch_op.create_index(batch_op.f('ix_series_accession_number'), ['accession_number'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_accession_number'))
        batch_op.drop_column('accession_number')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('progress_at')
        batch_op.drop_column('tiles_total')
        batch_op.drop_column('tiles_done')
    op.drop_table('control')
    op.drop_index(op.f('ix_node_heartbeat_at'), table_name='node')
    op.drop_table('node')
