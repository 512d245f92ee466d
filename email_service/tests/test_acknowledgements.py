"""The acknowledgement's caps: one per normalised mailbox per interval, a daily share per domain."""

import threading

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from email_service import acknowledgements, brake, sending
from email_service.acknowledgements import send_confirmation
from email_service.models import EmailRequest

VICTIM_VARIANTS = [
    "victim@gmail.com",
    "VICTIM@gmail.com",
    "victim+1@gmail.com",
    "victim+2@gmail.com",
    "victim+3@gmail.com",
    "v.ictim@gmail.com",
    "Vic.Tim+x@googlemail.com",
]


@pytest.fixture
def acks(smtp, db, settings):
    """Acknowledgements on, an empty cache, and the SMTP server's record of what was sent."""
    settings.EMAIL_SEND_CONFIRMATION = True
    settings.EMAIL_CONFIRMATION_INTERVAL = 3600
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 50
    cache.clear()
    yield smtp
    cache.clear()


def row(email):
    return EmailRequest.objects.create(full_name="A", email=email, message="Hello")


def test_variants_of_one_gmail_mailbox_get_one_acknowledgement(acks):
    sent = [send_confirmation(row(address)) for address in VICTIM_VARIANTS]
    assert sent == [True] + [False] * (len(VICTIM_VARIANTS) - 1)
    assert len(acks.messages) == 1


def test_seven_posts_to_one_gmail_mailbox_send_seven_mails_to_support_and_one_acknowledgement(
    acks, settings, dispatched, media_root
):
    settings.EMAIL_RATELIMIT_CREATE = "100/m"
    settings.SUPPORT_EMAIL = "support@tcall.ai"
    client = APIClient()
    addresses = [*VICTIM_VARIANTS[:6], "victim@gmail.com"]
    for address in addresses:
        form = {"full_name": "A", "email": address, "subject": "Hello", "message": "Hi"}
        assert client.post("/api/email/emails/", form, format="json").status_code == 201

    sending.send_due_emails(worker="test")

    assert len(acks.to("support@tcall.ai")) == 7
    acknowledged = [m for m in acks.messages if "support@tcall.ai" not in m["rcpt_tos"]]
    assert len(acknowledged) == 1
    assert EmailRequest.objects.exclude(confirmation_sent_at=None).count() == 1


def test_tags_and_case_are_one_mailbox_elsewhere_but_dots_are_not(acks):
    assert send_confirmation(row("ana@example.org"))
    assert not send_confirmation(row("ANA+promo@Example.org"))
    assert send_confirmation(row("a.na@example.org"))  # dots matter outside Gmail
    assert len(acks.messages) == 2


def test_the_mailbox_cap_survives_a_cache_flush(acks):
    assert send_confirmation(row("victim@gmail.com"))
    cache.clear()
    assert not send_confirmation(row("v.i.c.t.i.m+again@gmail.com"))
    assert len(acks.messages) == 1


def test_the_mailbox_cap_ends_after_the_interval(acks, settings):
    settings.EMAIL_CONFIRMATION_INTERVAL = 60
    first = row("ana@example.org")
    assert send_confirmation(first)
    cache.clear()  # as if the interval had passed for the cache too
    EmailRequest.objects.filter(pk=first.pk).update(
        confirmation_sent_at=first.created_at - acknowledgements.timedelta(seconds=61)
    )
    assert send_confirmation(row("ana@example.org"))


def test_a_domain_gets_at_most_its_daily_share(acks, settings):
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 3
    sent = [send_confirmation(row(f"person{number}@example.org")) for number in range(5)]
    assert sent == [True, True, True, False, False]
    assert send_confirmation(row("person0@example.com"))  # another domain has its own share
    assert len(acks.messages) == 4


def test_the_domain_share_survives_a_cache_flush(acks, settings):
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 2
    assert send_confirmation(row("one@example.org")) and send_confirmation(row("two@example.org"))
    cache.clear()
    assert not send_confirmation(row("three@example.org"))


def test_gmail_and_googlemail_share_one_domain_share(acks, settings):
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 1
    assert send_confirmation(row("one@gmail.com"))
    assert not send_confirmation(row("two@googlemail.com"))


def test_a_limit_of_zero_means_no_domain_cap(acks, settings):
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 0
    assert all(send_confirmation(row(f"person{number}@example.org")) for number in range(4))


def test_an_acknowledgement_not_sent_gives_its_caps_back(acks, settings):
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 1
    acks.script = ["550 5.1.1 No such mailbox"]
    failed = row("ana@example.org")
    assert not send_confirmation(failed)
    failed.refresh_from_db()
    assert failed.confirmation_sent_at is None and failed.confirmation_error.startswith("550")
    assert send_confirmation(row("ana@example.org"))
    assert len(acks.messages) == 1


def test_a_mailbox_receiving_too_fast_refuses_its_acknowledgement_without_pausing_sending(acks):
    # Gmail's 450 4.2.1 at RCPT pauses sending when the support mailbox says it; a stranger's
    # mailbox saying it about an acknowledgement concerns that mailbox only.
    acks.rcpt_reply = "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages"
    acknowledged = row("busy@example.org")
    assert not send_confirmation(acknowledged)
    # Refused by the server at RCPT, not skipped by a cap before any connection.
    assert "busy@example.org" in acks.rcpts_seen and acks.data_commands == 0
    assert brake.current(refresh=True).gate() is brake.Gate.RUN
    acknowledged.refresh_from_db()
    assert acknowledged.confirmation_error.startswith("450")


def test_a_421_at_rcpt_of_an_acknowledgement_is_the_server_and_pauses_sending(acks):
    # The server closing the connection is no mailbox's trouble: the next mail would meet it too.
    acks.rcpt_reply = "421 4.7.0 Try again later, closing connection."
    assert not send_confirmation(row("anyone@example.org"))
    assert "anyone@example.org" in acks.rcpts_seen
    state = brake.current(refresh=True)
    assert state.kind == "throttle" and state.until is not None


def test_an_acknowledgement_whose_cache_fails_returns_false_and_does_not_raise(acks, monkeypatch):
    def broken(*args, **kwargs):
        raise ConnectionError("the cache went away")

    monkeypatch.setattr(acknowledgements.cache, "add", broken)
    assert send_confirmation(row("ana@example.org")) is False
    assert acks.messages == []


def test_the_rolling_day_counts_the_last_24_hourly_buckets(acks, settings):
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 2
    start = 1_800_000_000.0
    assert acknowledgements._take_domain_slot("example.org", now=start)
    assert acknowledgements._take_domain_slot("example.org", now=start + 23 * 3600)
    assert not acknowledgements._take_domain_slot("example.org", now=start + 23 * 3600)
    # The first one's hour has left the day.
    assert acknowledgements._take_domain_slot("example.org", now=start + 24 * 3600)


def test_workers_racing_for_a_domain_take_no_more_than_its_share(settings):
    settings.EMAIL_CONFIRMATION_DOMAIN_DAILY_LIMIT = 3
    cache.clear()
    barrier = threading.Barrier(8)
    taken = []

    def take():
        barrier.wait()
        taken.append(acknowledgements._take_domain_slot("race.example"))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(taken) == 8
        # Every increment is counted once, so exactly the share passes and stays counted.
        assert sum(1 for key in taken if key) == 3
        assert cache.get(acknowledgements._domain_keys("race.example")[0]) == 3
    finally:
        cache.clear()


def test_the_domain_share_is_kept_under_a_keyed_hash_not_a_plain_one(settings):
    import hashlib

    from medcor_backend2.keys import generate_key

    plain = hashlib.sha256(b"clinic-of-dr-roe.example").hexdigest()
    keys = acknowledgements._domain_keys("clinic-of-dr-roe.example", now=1_800_000_000.0)
    assert not any(plain in key for key in keys)
    settings.MEDCOR_INDEX_KEY = generate_key()
    # Under another index key the same domain is another entry: the key is what the hash needs.
    assert set(acknowledgements._domain_keys("clinic-of-dr-roe.example", now=1_800_000_000.0)).isdisjoint(
        keys
    )
