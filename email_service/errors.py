"""Django's error handlers: JSON under /api/, where every answer is JSON; Django's pages elsewhere."""

from django.http import JsonResponse
from django.views import defaults


def json_under_api(status, detail, django_handler):
    """Return a handler that answers `{"detail": detail}` under /api/ and calls `django_handler` elsewhere."""

    def handler(request, *args, **kwargs):
        # Passed on as given: Django hands the 400, 403 and 404 handlers an `exception`, the 500 one nothing.
        if request.path.startswith("/api/"):
            return JsonResponse({"detail": detail}, status=status)
        return django_handler(request, *args, **kwargs)

    handler.__doc__ = f"Answer {status} as JSON under /api/, Django's page elsewhere."
    return handler


bad_request = json_under_api(400, "Bad request.", defaults.bad_request)
permission_denied = json_under_api(403, "Permission denied.", defaults.permission_denied)
not_found = json_under_api(404, "Not found.", defaults.page_not_found)
server_error = json_under_api(500, "Internal server error.", defaults.server_error)
