from django.core.management.base import BaseCommand, CommandError

from email_service import rotation


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored value and attachment under the first of MEDCOR_ENCRYPTION_KEYS, in "
        "batches; safe to interrupt and run again. Lists the requests with values under a key that is "
        "no longer configured, and exits 1 if there are any."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--batch-size", type=int, default=rotation.BATCH_SIZE, help="Rows per transaction."
        )

    def handle(self, *args, batch_size, verbosity, **options):
        progress = self.stdout.write if verbosity > 1 else None
        report = rotation.rotate_keys(batch_size=batch_size, progress=progress)
        for key, count in report.as_detail().items():
            self.stdout.write(f"{key}: {count}")
        for title, found in (
            ("under a key no longer in MEDCOR_ENCRYPTION_KEYS", report.unknown_key),
            ("that could not be read", report.unreadable),
        ):
            if found:
                self.stdout.write(f"Requests with values {title}:")
                for request_id in sorted(found):
                    self.stdout.write(f"  {request_id}: {', '.join(sorted(found[request_id]))}")
        if report.unknown_key or report.unreadable:
            raise CommandError(
                f"{len(report.affected_requests())} request(s) still hold values the first key does not "
                "cover (listed above): keep the key they are under configured, or erase them."
            )
        self.stdout.write(self.style.SUCCESS("Every value and file is under the first key."))
