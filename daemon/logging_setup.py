"""Daemon logging: quiet structured text by default, one JSON object per line with ``format="json"``.

Extra fields given as ``logger.info("msg", extra={"source": "cam1"})`` appear as ``key=value`` (text) or
as JSON keys. Credentials (``user:pass@``) and values of secret-looking keys are redacted in every line
(daemon/redact.py). Third-party loggers are held at WARNING so ``info`` stays readable.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from daemon.redact import redact_value, scrub

_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_NOISY = ("aiomqtt", "aiohttp.access", "asyncio", "PIL", "libav", "jittor", "urllib3")


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: redact_value(k, v) for k, v in vars(record).items()
            if k not in _STD_ATTRS and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        obj.update({k: v if isinstance(v, (int, float, bool, type(None))) else scrub(str(v))
                    for k, v in _extras(record).items()})
        if record.exc_info:
            obj["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(obj)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once (idempotent: replaces handlers installed by an earlier call)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
