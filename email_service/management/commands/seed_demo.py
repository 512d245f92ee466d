"""A month of made-up contact requests in every status, for trying the admin and its statistics."""

import random
from collections import Counter
from datetime import timedelta

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from email_service import outbox, sending
from email_service.models import AttemptOutcome, EmailAttempt, EmailRequest, EmailStatus

WORKER = "celery@demo-worker:4242"
FIRST_NAMES = (
    "Amelia",
    "Jonas",
    "Priya",
    "Mateo",
    "Chen",
    "Fatima",
    "Oliver",
    "Sofia",
    "Kwame",
    "Ingrid",
    "Lucas",
    "Aisha",
    "Hannah",
    "Tomasz",
    "Yuki",
    "Carmen",
    "Noah",
    "Leila",
    "Emeka",
    "Greta",
)
LAST_NAMES = (
    "Hartmann",
    "Okafor",
    "Nair",
    "García",
    "Wei",
    "Haddad",
    "Brown",
    "Rossi",
    "Mensah",
    "Larsen",
    "Dubois",
    "Khan",
    "Schmidt",
    "Nowak",
    "Tanaka",
    "López",
    "Miller",
    "Farah",
    "Eze",
    "Berg",
)
PROFESSIONS = (
    "Cardiology nurse",
    "General practitioner",
    "Practice manager",
    "Patient",
    "Pharmacist",
    "Physiotherapist",
    "Radiographer",
    "Clinic receptionist",
    "Medical student",
    "",
)
TOPICS = (
    ("Question about my referral", "My GP referred me for an ECG. Could you confirm the appointment date?"),
    ("Billing question", "I was charged twice for the consultation on the 3rd. Could you check?"),
    ("Request for medical records", "Please send me a copy of my records from last year's visit."),
    ("Partnership enquiry", "Our clinic would like to offer MedCor booking to our patients."),
    ("Cannot log in to the portal", "The password reset email never arrives. What can I do?"),
    ("Prescription renewal", "My repeat prescription runs out next week; how do I renew it online?"),
    ("Feedback on my visit", "The staff were very kind. The waiting room could use more chairs."),
    ("Change of appointment", "I need to move my appointment on Thursday to the following week."),
    ("Data protection request", "Please tell me which personal data you hold about me."),
    ("Test results", "I had blood taken ten days ago and have not heard back yet."),
)
ATTACHMENTS = ("Referral letter.pdf", "Invoice 2291.pdf", "Insurance card.pdf", "Lab results.pdf")


class Command(BaseCommand):
    help = (
        "Create a realistic month of demo contact requests (sent, retried, failed, cancelled, pending) "
        "through the same state transitions as real ones. Under `make run` the outbox relay sends the "
        "PENDING ones to the local sink."
    )

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=240, help="How many requests to create.")
        parser.add_argument("--days", type=int, default=30, help="Spread them over this many days.")
        parser.add_argument("--seed", type=int, default=6, help="Random seed, for the same data every time.")
        parser.add_argument("--force", action="store_true", help="Run even when DJANGO_DEBUG is false.")

    def handle(self, *args, count, days, seed, force, **options):
        if not settings.DEBUG and not force:
            raise CommandError(
                "seed_demo writes made-up requests; it runs only with DJANGO_DEBUG=true, or with --force."
            )
        if count < 1 or days < 1:
            raise CommandError("--count and --days must be at least 1.")
        statuses = seed_demo(count=count, days=days, rng=random.Random(seed))
        summary = ", ".join(f"{statuses[status]} {status}" for status in EmailStatus if statuses[status])
        self.stdout.write(f"Created {sum(statuses.values())} demo email requests: {summary}.")


def seed_demo(*, count, days, rng, now=None):
    """Create `count` requests over the last `days` days; return how many ended in each status."""
    now = now or timezone.now()
    outage_day = min(days - 1, 9)  # one bad day, as when an SMTP password was revoked
    statuses = Counter()
    with transaction.atomic():
        for index in range(count):
            age_days = _age_in_days(rng, days)
            created = _office_hours(rng, now - timedelta(days=age_days), now)
            if index < count // 40:
                # A few from the last minutes, still on their way.
                age_days, created = 0, now - timedelta(seconds=rng.uniform(5, 1500))
            email_request = _create(rng, created)
            story = _story(rng, now - created, age_days == outage_day)
            status, last_change = _play(story, email_request, created, now, rng)
            # The transitions stamp `updated_at` with the real clock; the demo's story happened earlier.
            EmailRequest.objects.filter(pk=email_request.pk).update(updated_at=last_change)
            statuses[status] += 1
    return statuses


def _age_in_days(rng, days):
    # More recent traffic than old, as a growing service sees.
    return min(days - 1, int(rng.triangular(0, days, 0)))


def _office_hours(rng, day, now):
    moment = day.replace(
        hour=rng.choice((7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 21)),
        minute=rng.randrange(60),
        second=rng.randrange(60),
    )
    # Today's requests cannot come from the future; squeeze them into the hours gone by.
    return moment if moment < now else now - timedelta(minutes=rng.uniform(1, 240))


def _create(rng, created):
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    subject, message = rng.choice(TOPICS)
    data = {
        "full_name": f"{first} {last}",
        "email": f"{first}.{last}@example.org".lower().replace("í", "i").replace("ó", "o"),
        "phone": f"+44 20 7946 {rng.randrange(10000):04d}" if rng.random() < 0.6 else "",
        "job_profession": rng.choice(PROFESSIONS),
        "subject": subject,
        "message": message,
        "created_at": created,
        "next_attempt_at": created,
    }
    upload = None
    if rng.random() < 0.18:
        upload = ContentFile(_demo_pdf(subject), name=rng.choice(ATTACHMENTS))
    return outbox.create_email_request(
        data=data, upload=upload, content_type="application/pdf" if upload else "", dispatch_on_commit=False
    )


def _story(rng, age, outage):
    """Choose what happens to a request: a list of attempt outcomes, or a final word."""
    if age < timedelta(minutes=3):
        return "pending"
    if age < timedelta(minutes=20) and rng.random() < 0.5:
        return "waiting-retry"
    if outage:
        return "outage" if rng.random() < 0.8 else "sent"
    roll = rng.random()
    if roll < 0.04:
        return "cancelled"
    if roll < 0.09:
        return "rejected"
    if roll < 0.16:
        return "retried"
    return "sent"


def _play(story, email_request, created, now, rng):
    """Take the request through the state machine's transitions, as a worker would have.

    Return the status it ends in and when it got there.
    """
    pk = email_request.pk
    if story == "pending":
        return EmailStatus.PENDING, created
    if story == "cancelled":
        EmailRequest.objects.filter(pk=pk).cancel()
        return EmailStatus.CANCELLED, min(now, created + timedelta(minutes=rng.uniform(1, 30)))
    moment = created + timedelta(seconds=rng.uniform(0.2, 1.5))
    attempts = {
        "sent": ["sent"],
        "retried": ["421", "sent"],
        "rejected": ["550"],
        "outage": ["refused"] * 4,
        "waiting-retry": ["421"],
    }[story]
    for number, outcome in enumerate(attempts, start=1):
        token = EmailRequest.objects.claim(pk, worker=WORKER, now=moment)
        duration = rng.lognormvariate(0.2, 0.6) if outcome == "sent" else rng.uniform(0.05, 2)
        finished = moment + timedelta(seconds=duration)
        _record_attempt(email_request, number, moment, finished, outcome)
        if outcome == "sent":
            EmailRequest.objects.complete(pk, token, now=finished)
            return EmailStatus.SENT, finished
        error = _ERRORS[outcome][2]
        if outcome == "550" or number == len(attempts) and story != "waiting-retry":
            EmailRequest.objects.fail(pk, token, error=error, retry_count=number - 1)
            return EmailStatus.FAILED, finished
        moment = finished + timedelta(seconds=sending.retry_backoff(number))
        if story == "waiting-retry":
            moment = max(moment, now + timedelta(minutes=2))
        EmailRequest.objects.defer(pk, token, error=error, retry_count=number, next_attempt_at=moment)
    return EmailStatus.PENDING, finished


_ERRORS = {
    "421": (421, "SMTPDataError", "421 4.7.0 Try again later, closing connection."),
    "550": (
        550,
        "SMTPRecipientsRefused",
        "550 5.1.1 The email account that you tried to reach does not exist.",
    ),
    "refused": (
        None,
        "ConnectionRefusedError",
        "Could not connect to smtp.gmail.com:587: connection refused.",
    ),
}


def _record_attempt(email_request, number, started, finished, outcome):
    if outcome == "sent":
        code, error_class, error_text, kind = None, "", "", AttemptOutcome.SENT
    else:
        code, error_class, error_text = _ERRORS[outcome]
        kind = AttemptOutcome.PERMANENT if outcome == "550" else AttemptOutcome.TRANSIENT
    EmailAttempt.objects.create(
        request=email_request,
        number=number,
        started_at=started,
        finished_at=finished,
        outcome=kind,
        smtp_code=code,
        error_class=error_class,
        error_text=error_text,
        worker=WORKER,
        duration_ms=int((finished - started).total_seconds() * 1000),
    )


def _demo_pdf(title):
    """A one-page PDF whose only text is `title`."""
    content = f"BT /F1 14 Tf 72 720 Td ({title}) Tj ET".encode("latin-1", "replace")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    body, offsets = b"%PDF-1.4\n", []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n%s\nendobj\n" % (number, obj)
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    body += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    body += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return body
