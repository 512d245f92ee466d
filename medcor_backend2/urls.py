from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from email_service import contact
from email_service.health import healthz
from medcor_backend2 import apps, docs

# Before admin.site.urls below, which lists the pages of what is registered by then: a Celery
# process loads the admin's modules only here (medcor_backend2/apps.py); elsewhere they are loaded.
apps.discover()

# No route serves MEDIA_URL: attachments are private and reached only through the staff API.
# admin.site is the staff admin site (medcor_backend2/admin_site.py: TOTP, lockout).
urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/email/", include("email_service.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", docs.swagger_ui, name="swagger-ui"),
    path("api/redoc/", docs.redoc, name="redoc"),
    path("api/redoc/redoc.standalone.js", docs.redoc_bundle, name="redoc-bundle"),
    path("healthz", healthz, name="healthz"),
    path("contact/", contact.contact_page, name="contact"),
    path("contact/sent/<uuid:pk>/", contact.contact_sent, name="contact-sent"),
]

handler400 = "email_service.errors.bad_request"
handler403 = "email_service.errors.permission_denied"
handler404 = "email_service.errors.not_found"
handler500 = "email_service.errors.server_error"
