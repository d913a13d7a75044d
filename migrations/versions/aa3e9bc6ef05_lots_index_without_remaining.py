"""lots index without remaining

A debit changes its lot's ``remaining``. With ``remaining`` in the lots' index, no such UPDATE could be
a heap-only (HOT) update on PostgreSQL: every debit added an index entry for the hottest rows, and the
lot lookup of a busy wallet waded through the dead ones (a hot wallet ran at about 60% of the
hand-written debit's throughput, 90% with this index; docs/benchmarks.md). The new index also matches
the order lots are drawn in. It is created before the old one is dropped: MariaDB refuses to drop the
only index its foreign key on ``wallet_id`` can use.

Revision ID: aa3e9bc6ef05
Revises: 5df187326179
Create Date: 2026-11-28 06:33:17.045018

"""
from alembic import op


# revision identifiers, used by Alembic.
revision = 'aa3e9bc6ef05'
down_revision = '5df187326179'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('credits_lots', schema=None) as batch_op:
        batch_op.create_index('ix_credits_lots_wallet_expiry', ['wallet_id', 'expires_at', 'id'], unique=False)
    with op.batch_alter_table('credits_lots', schema=None) as batch_op:
        batch_op.drop_index('ix_credits_lots_wallet_id')


def downgrade():
    with op.batch_alter_table('credits_lots', schema=None) as batch_op:
        batch_op.create_index('ix_credits_lots_wallet_id', ['wallet_id', 'remaining'], unique=False)
    with op.batch_alter_table('credits_lots', schema=None) as batch_op:
        batch_op.drop_index('ix_credits_lots_wallet_expiry')
