import time

from django.core.management.base import BaseCommand, CommandError

from email_service import services
from email_service.models import FINAL_STATUSES, EmailRequest, EmailStatus


class Command(BaseCommand):
    help = "Create a real email request, queue it, and optionally wait until it is delivered."

    def add_arguments(self, parser):
        parser.add_argument("--email", default="test@example.com", help="The submitter's address.")
        parser.add_argument("--name", default="Test User", help="The submitter's name.")
        parser.add_argument(
            "--wait", type=float, default=0, metavar="SECONDS",
            help="Wait up to this long for a final status; exit 0 only if it is SENT.",
        )

    def handle(self, *args, email, name, wait, **options):
        email_request = services.create_email_request(
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
            services.publish(email_request)
        except Exception as exc:
            raise CommandError(
                f"Could not reach the broker ({type(exc).__name__}: {exc}). The request stays "
                "PENDING and the periodic dispatch sends it once the broker answers."
            ) from exc
        self.stdout.write(f"Queued as task {email_request.celery_task_id}")
        if wait:
            self._wait(email_request.pk, wait)

    def _wait(self, pk, seconds):
        deadline = time.monotonic() + seconds
        last = None
        while True:
            row = EmailRequest.objects.get(pk=pk)
            seen = (row.status, row.retry_count, row.error_message)
            if seen != last:
                error = f" (last error: {row.error_message})" if row.error_message else ""
                self.stdout.write(f"Status: {row.status}, retries: {row.retry_count}{error}")
                last = seen
            if row.status in FINAL_STATUSES or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.stdout.write(f"Final status: {row.status}")
        if row.status != EmailStatus.SENT:
            reason = row.error_message or "no error recorded yet"
            if row.status not in FINAL_STATUSES:
                reason = f"still {row.status} after {seconds:g}s; last error: {reason}"
            raise CommandError(f"The email was not sent: {reason}")
