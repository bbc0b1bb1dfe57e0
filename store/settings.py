"""Deployment settings: one pydantic-settings object, read from ``PFLAT_*`` environment variables.

With nothing set, everything is embedded under ``./var``: a SQLite database, a SQLite-backed Celery broker
(kombu's SQLAlchemy transport), artifacts on local disk.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PFLAT_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root of every embedded default below.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/pflat.db")
    broker_url: str | None = Field(None, description="Celery broker; default sqla+sqlite:///<data_dir>/broker.db")
    storage_url: str | None = Field(None, description="file:///path or s3://bucket/prefix?endpoint_url=...")
    cache_dir: Path = Field(Path.home() / ".cache" / "pflat", description="Converted base models.")
    device: str = Field("auto", description="Worker device: auto, cpu, cuda, cuda:N.")
    max_upload_bytes: int = Field(100 * 1024 * 1024, description="Uploads larger than this get 413.")
    default_epsilon_max: float = Field(10.0, description="Budget of a dataset created without one.")
    default_delta: float = Field(1e-5, description="δ of a dataset created without one.")
    visibility_timeout_s: int = Field(7 * 24 * 3600, description="Broker redelivery timeout (> any job).")
    event_every_steps: int = Field(1, description="Write a progress event every N training steps.")
    webhook_secret: str | None = Field(None, description="HMAC key for webhooks (per deployment).")

    @field_validator("database_url", "broker_url", "storage_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'pflat.db').resolve()}"

    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    def resolved_storage_url(self) -> str:
        return self.storage_url or str((self.data_dir / "artifacts").resolve())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings
