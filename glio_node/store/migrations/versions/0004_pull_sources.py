"""pull_source, pull_series: what the DICOMweb pull mode polled and took, so nothing is fetched twice.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('pull_source',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=16), nullable=False),
    sa.Column('last_poll_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_success_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pull_source')),
    sa.UniqueConstraint('name', name=op.f('uq_pull_source_name'))
    )
    op.create_table('pull_series',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('state', sa.Enum('seen', 'taken', 'skipped', name='pull_state', native_enum=False, create_constraint=True, length=16), nullable=False),
    sa.Column('instance_count', sa.Integer(), nullable=True),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('taken_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pull_series')),
    sa.UniqueConstraint('source', 'series_instance_uid', name=op.f('uq_pull_series_source_series_instance_uid'))
    )


def downgrade() -> None:
    op.drop_table('pull_series')
    op.drop_table('pull_source')
