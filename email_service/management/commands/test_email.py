import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from email_service import brake, outbox
from email_service.models import FINAL_STATUSES, EmailRequest, EmailStatus


class Command(BaseCommand):
    help = "Create a real email request, queue it, and optionally wait until it is delivered."

    def add_arguments(self, parser):
        parser.add_argument("--email", default="test@example.com", help="The submitter's address.")
        parser.add_argument("--name", default="Test User", help="The submitter's name.")
        parser.add_argument(
            "--wait",
            type=float,
            default=0,
            metavar="SECONDS",
            help="Wait up to this long for a final status; exit 0 only if it is SENT.",
        )

    def handle(self, *args, email, name, wait, **options):
        email_request = outbox.create_email_request(
            data={
                "full_name": name,
                "email": email,
                "subject": "Test email from manage.py test_email",
                "message": "This is a test of the MedCor email service.",
            },
            dispatch_on_commit=False,
        )
        self.stdout.write(f"Created email request {email_request.pk}")
        try:
            outbox.publish(email_request)
        except Exception as exc:
            raise CommandError(
                f"Could not reach the broker ({type(exc).__name__}: {exc}). The request stays "
                "PENDING and the periodic dispatch sends it once the broker answers."
            ) from exc
        self.stdout.write(f"Queued as task {email_request.celery_task_id}")
        if wait:
            self._wait(email_request.pk, wait)

    def _wait(self, pk, seconds):
        started = time.monotonic()
        last, last_report = None, started
        while True:
            row = EmailRequest.objects.get(pk=pk)
            elapsed = time.monotonic() - started
            seen = (row.status, row.retry_count, row.error_message)
            if seen != last:
                error = f" (last error: {row.error_message})" if row.error_message else ""
                self.stdout.write(
                    f"[{elapsed:4.1f}s] Status: {row.status}, retries: {row.retry_count}{error}"
                )
                last, last_report = seen, time.monotonic()
            elif time.monotonic() - last_report >= 5:
                # Something every few seconds, so that a long wait does not look like a hang.
                self.stdout.write(f"[{elapsed:4.1f}s] Still {row.status}...")
                last_report = time.monotonic()
            if row.status in FINAL_STATUSES or elapsed > seconds or _held_by_brake(row):
                break
            time.sleep(0.5)
        self.stdout.write(f"Final status: {row.status}")
        if row.status != EmailStatus.SENT:
            reason = row.error_message or "no error recorded yet"
            if _held_by_brake(row):
                paused = brake.describe()
                reason = (
                    f"sending is paused ({paused['sending_paused_reason']}; until "
                    f"{paused['sending_paused_until'] or 'an operator resumes it'}); last error: {reason}"
                )
            elif row.status not in FINAL_STATUSES:
                reason = f"still {row.status} after {seconds:g}s; last error: {reason}"
                if not row.attempts.exists():
                    reason += (
                        f". No worker has tried it: is `celery -A medcor_backend2 worker` running and "
                        f"consuming the queue '{settings.CELERY_TASK_DEFAULT_QUEUE}'?"
                    )
            raise CommandError(f"The email was not sent: {reason}")


def _held_by_brake(row):
    """Say whether the row was tried and now waits for the sender-wide brake: waiting longer is moot."""
    return (
        row.status == EmailStatus.PENDING
        and bool(row.error_message)
        and brake.current(refresh=True).is_engaged
    )
