import json

from django.core.management.base import BaseCommand, CommandError

from email_service import audit


class Command(BaseCommand):
    help = (
        "The audit trail: `verify` checks its HMAC chain (exit 1 if an entry was changed or removed); "
        "`export` prints one JSON object per entry and line."
    )

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="command", required=True)
        commands.add_parser("verify", help="Walk the chain; print the count and the first broken entry.")
        export = commands.add_parser("export", help="Print entries as JSON lines, oldest first.")
        export.add_argument(
            "--since", help="Only entries from this ISO date or date-time on (UTC by default)."
        )

    def handle(self, *args, command, **options):
        if command == "verify":
            self._verify()
        else:
            self._export(options.get("since"))

    def _verify(self):
        result = audit.verify()
        if result.ok:
            self.stdout.write(f"{result.count} audit entries verified; the chain is intact.")
            return
        entry = result.first_broken
        self.stdout.write(
            f"{result.count} audit entries, {result.broken} broken. First broken: #{entry.pk} "
            f"({entry.action} at {entry.time.isoformat()}): {result.reason}."
        )
        raise CommandError("The audit trail is broken.", returncode=1)

    def _export(self, since):
        try:
            since = audit.parse_since(since) if since else None
        except ValueError as error:
            raise CommandError(str(error)) from error
        for line in audit.export(since=since):
            self.stdout.write(json.dumps(line, separators=(",", ":")))
