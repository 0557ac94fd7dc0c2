"""Storage Commitment: one row per N-ACTION request, and delivery.committed_at.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'storage_commitment',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('job_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('transaction_uid', sa.String(length=64), nullable=False),
        sa.Column(
            'state',
            sa.Enum('requested', 'confirmed', 'failed', 'refused', 'expired',
                    name='commitment_state', native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column('sop_instance_uids', sa.JSON(), nullable=False),
        sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('answered_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_status', sa.String(length=64), nullable=True),
        sa.Column('failures', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['job.id'], name=op.f('fk_storage_commitment_job_id_job')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_storage_commitment')),
        sa.UniqueConstraint('job_id', 'destination', 'attempt',
                            name=op.f('uq_storage_commitment_job_id_destination_attempt')),
        sa.UniqueConstraint('transaction_uid', name=op.f('uq_storage_commitment_transaction_uid')),
    )
    with op.batch_alter_table('storage_commitment', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_storage_commitment_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_storage_commitment_state'), ['state'], unique=False)
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.add_column(sa.Column('committed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_column('committed_at')
    with op.batch_alter_table('storage_commitment', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_storage_commitment_state'))
        batch_op.drop_index(batch_op.f('ix_storage_commitment_job_id'))
    op.drop_table('storage_commitment')
