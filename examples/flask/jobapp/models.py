"""The job table (Flask-SQLAlchemy); ``flask --app jobapp init-db`` creates it."""

from datetime import UTC, datetime

import click
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import JSON, DateTime, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def now() -> datetime:
    return datetime.now(UTC)


class Job(db.Model):
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    task: Mapped[str] = mapped_column(String(20))
    args: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[object | None] = mapped_column(JSON)


@click.command("init-db")
def init_db_command() -> None:
    """Create the tables (once, before the first start)."""
    db.create_all()
    click.echo("Initialized the database.")


def init_app(app: Flask) -> None:
    db.init_app(app)
    app.cli.add_command(init_db_command)
