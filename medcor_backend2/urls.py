from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from email_service import contact
from email_service.health import healthz

# No route serves MEDIA_URL: attachments are private and reached only through the staff API.
urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/email/", include("email_service.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("healthz", healthz, name="healthz"),
    path("contact/", contact.contact_page, name="contact"),
    path("contact/sent/<uuid:pk>/", contact.contact_sent, name="contact-sent"),
]

handler400 = "email_service.errors.bad_request"
handler403 = "email_service.errors.permission_denied"
handler404 = "email_service.errors.not_found"
handler500 = "email_service.errors.server_error"
