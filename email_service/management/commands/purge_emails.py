from django.core.management.base import BaseCommand

from email_service import conf, retention


class Command(BaseCommand):
    help = (
        "Delete requests in a final status (SENT, FAILED, CANCELLED) older than EMAIL_RETENTION_DAYS, "
        "with their attachments, and attachment files that no request refers to."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Count what would go; delete nothing.")

    def handle(self, *args, dry_run, **options):
        counts = retention.purge_expired(dry_run=dry_run)
        verb = "Would delete" if dry_run else "Deleted"
        self.stdout.write(
            f"{verb} {counts['rows']} request(s) older than {conf.retention_days()} days "
            f"with {counts['files']} attachment file(s), and {counts['orphans']} orphaned file(s)."
        )
