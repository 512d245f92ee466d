"""POST /contact/: the form, stored, and one mail queued with post_office.mail.send."""

from contact.views import contact_view, support_address
from django.urls import path
from post_office import mail


def queue_mail(row, subject, text, html):
    """Queue the support mail in post_office's outbox; its Celery task is published on commit."""
    mail.send(
        support_address(),
        subject=subject,
        message=text,
        html_message=html,
        headers={"Reply-To": row.email, "X-Contact-Request-ID": str(row.pk)},
    )


urlpatterns = [path("contact/", contact_view(queue_mail))]
