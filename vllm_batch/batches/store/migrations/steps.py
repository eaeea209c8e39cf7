"""Steps the schema revisions repeat: string ids, child rows deleted with their parent,
and tables created or dropped together with their indexes."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op


def id_column(length: int = 64) -> sa.Column[Any]:
    """The table's string primary key, ``id``."""
    return sa.Column("id", sa.String(length), primary_key=True)


def parent_column(name: str, parent: str, *, primary_key: bool = False) -> sa.Column[Any]:
    """A non-null reference to ``parent.id``; the row is deleted with its parent."""
    return sa.Column(
        name,
        sa.String(64),
        sa.ForeignKey(f"{parent}.id", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )


def create_table(
    name: str, *columns: sa.Column[Any], indexes: dict[str, list[str]] | None = None
) -> None:
    """Create ``name`` with ``columns``, then each index (name to its columns)."""
    op.create_table(name, *columns)
    for index, on in (indexes or {}).items():
        op.create_index(index, name, on)


def drop_table(name: str, indexes: tuple[str, ...] = ()) -> None:
    """Drop each of ``name``'s ``indexes`` (in order), then the table."""
    for index in indexes:
        op.drop_index(index, name)
    op.drop_table(name)
