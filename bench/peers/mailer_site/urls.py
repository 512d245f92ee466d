"""POST /contact/: the form, stored, and one mail queued with django-mailer."""

import mailer
from contact.views import contact_view, support_address
from django.urls import path


def queue_mail(row, subject, text, html):
    """Queue the support mail (text and HTML, as the service's) in django-mailer's table."""
    mailer.send_html_mail(
        subject,
        text,
        html,
        None,
        [support_address()],
        headers={"Reply-To": row.email, "X-Contact-Request-ID": str(row.pk)},
    )


urlpatterns = [path("contact/", contact_view(queue_mail))]
