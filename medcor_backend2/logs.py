"""Log formatting for collectors (one JSON object per line), and the filter that keeps personal data out."""

import json
import logging
import re
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else was passed through `extra=` and is kept.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

# An address as people write them, display names aside: enough to catch what SMTP servers and
# URLs echo back. The replacement keeps the domain out too: a clinic's domain can name a person.
_ADDRESS = re.compile(r"[\w.!#$%*+^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
# A query string after a path or URL: staff filters (`?email=...&search=...`) carry personal data.
_QUERY = re.compile(r"((?:https?://[^\s/?#\"'<>]+)?/[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
ADDRESS_MARK = "[address]"
QUERY_MARK = "?[query]"
# Values of `extra` that are kept as they are; anything else is logged as its scrubbed text.
_PLAIN = (int, float, bool, type(None))


def scrub(text):
    """Return `text` with e-mail addresses and URL query strings replaced by placeholders."""
    # Query strings first: an address inside one goes with it, and the path stays readable.
    return _ADDRESS.sub(ADDRESS_MARK, _QUERY.sub(lambda match: match.group(1) + QUERY_MARK, text))


class ScrubPersonalData(logging.Filter):
    """Remove addresses and query strings from a record: message, arguments, traceback, extras.

    Installed on every handler, so it sees each record of every logger at every level, whoever
    wrote the log call. The message is formatted here and its arguments dropped, because an
    argument's text (an exception, a request) is where an address usually hides.
    """

    def filter(self, record):
        if getattr(record, "_scrubbed", False):
            return True
        record.msg = scrub(record.getMessage())
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        # The traceback is now text; keeping exc_info would let a formatter print it unscrubbed.
        record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in _STANDARD and not isinstance(value, _PLAIN):
                # A request object prints as its method and full path, query string included.
                setattr(record, name, scrub(value if isinstance(value, str) else str(value)))
        record._scrubbed = True
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON with its `extra` fields."""

    def format(self, record):
        entry = {
            # UTC with milliseconds, so lines from web, worker and beat containers sort together.
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        return json.dumps(entry, default=str)
