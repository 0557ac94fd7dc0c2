"""Slide QC: the verdict of a finished analysis, stored with its job for the status page.

- ``job.qc``: JSON, ``{"verdict": "pass"|"warn"|"fail", "reasons": [{code, name, meaning,
  area_mm2, severity}], "usable_tissue_mm2"}`` (glio_node.results.QcReport.as_dict); NULL for
  jobs finished before this revision, or analysed with QC off.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('qc', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('qc')
