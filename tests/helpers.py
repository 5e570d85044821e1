"""Helpers for tests that run the CLI as a user would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from supportlens.config import Settings


def supportlens_cmd(*args: str) -> list[str]:
    """The installed console script, run as a user would."""
    script = Path(sys.executable).with_name("supportlens")
    return [str(script), *args]


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a subprocess resolve the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTLENS_")}
    env.update(
        SUPPORTLENS_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        SUPPORTLENS_TOPIC_PREFIX=settings.topic_prefix,
        SUPPORTLENS_PARTITIONS=str(settings.partitions),
        SUPPORTLENS_STATE_DIR=str(settings.state_dir),
        NO_COLOR="1",
        COLUMNS="200",
    )
    return env
