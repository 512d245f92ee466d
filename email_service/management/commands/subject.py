from django.core.management.base import BaseCommand, CommandError

from email_service import subjects
from email_service.audit import AuditChannel


class Command(BaseCommand):
    help = (
        "Subject access and erasure: `export` writes everything kept about one person (requests, "
        "attempts, replies, files) to a zip; `erase` removes it and prints what went."
    )

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="command", required=True)
        export = commands.add_parser("export", help="Write the person's requests and files to a new zip.")
        export.add_argument("--email", required=True, help="The person's address, as they wrote it.")
        export.add_argument("--out", required=True, help="The zip file to create (never replaced).")
        erase = commands.add_parser("erase", help="Remove the person's requests, replies and files.")
        erase.add_argument("--email", required=True, help="The person's address, as they wrote it.")
        erase.add_argument("--dry-run", action="store_true", help="Print what would go; remove nothing.")

    def handle(self, *args, command, email, **options):
        if command == "export":
            self._export(email, options["out"])
        else:
            self._erase(email, options["dry_run"])

    def _export(self, email, out):
        try:
            counts = subjects.export_subject_to_path(email, out, channel=AuditChannel.COMMAND)
        except FileExistsError as error:
            raise CommandError(f"{error}: the file exists; name a new one.") from error
        self.stdout.write(f"Wrote {out}: {_summary(counts)}.")
        if counts["missing_files"]:
            self.stdout.write(f"{counts['missing_files']} file(s) were no longer in storage.")

    def _erase(self, email, dry_run):
        records, counts = subjects.erase_subject(email, channel=AuditChannel.COMMAND, dry_run=dry_run)
        verb = "Would erase" if dry_run else "Erased"
        for row in records.requests:
            self.stdout.write(
                f"{verb} request {row.pk} of {row.created_at:%Y-%m-%d} ({row.status}): "
                f"{len(records.attempts.get(row.pk, []))} attempt(s), "
                f"{len(records.replies.get(row.pk, []))} reply(ies), {len(records.files(row))} file(s)."
            )
        self.stdout.write(f"{verb} {_summary(counts)}.")


def _summary(counts):
    return (
        f"{counts['requests']} request(s), {counts['attempts']} attempt(s), "
        f"{counts['replies']} reply(ies) and {counts['files']} file(s)"
    )
