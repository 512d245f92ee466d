"""The API's Swagger UI and ReDoc pages under the service's Content-Security-Policy.

Both pages load their bundles from the service's own static files (drf-spectacular-sidecar); the
one inline script and style of each page carry this response's nonce (templates/drf_spectacular/),
so no 'unsafe-inline' is needed. ReDoc is handed the nonce for the styles it injects, and runs
its search index in a worker it makes from a blob.

Two things in ReDoc's bundle reach past that, and are dealt with here: it injects one stylesheet
(perfect-scrollbar's) before it can be given the nonce, let through by its hash; and it shows
Redocly's logo from their CDN, so the bundle is served with that address replaced by an empty
image. tests/test_docs_browser.py fails if a new sidecar version changes either.
"""

import functools

from csp.constants import NONCE
from csp.decorators import csp_update
from django.contrib.staticfiles import finders
from django.http import HttpResponse
from django.urls import reverse
from django.views.decorators.http import require_GET
from drf_spectacular.views import SpectacularRedocView, SpectacularSwaggerView

REDOC_BUNDLE = "drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js"
REDOC_LOGO_URL = "https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_IMAGE = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"
# SHA-256 of the perfect-scrollbar stylesheet ReDoc injects at load (drf-spectacular-sidecar 2026.10.1),
# and of the empty text its style element holds when it is first inserted.
REDOC_STYLE_HASHES = [
    "'sha256-QMIg+bpjm3JdElJ388KYke01izlUW0UoNOeKjpMxdgc='",
    "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='",
]


class RedocView(SpectacularRedocView):
    @staticmethod
    def _redoc_standalone():
        return reverse("redoc-bundle")


@functools.cache
def _redoc_bundle():
    with open(finders.find(REDOC_BUNDLE), encoding="utf-8") as bundle:
        return bundle.read().replace(REDOC_LOGO_URL, EMPTY_IMAGE)


@require_GET
def redoc_bundle(request):
    """Serve ReDoc's standalone bundle without the one address outside the service it would load."""
    response = HttpResponse(_redoc_bundle(), content_type="text/javascript; charset=utf-8")
    response["Cache-Control"] = "public, max-age=86400"
    return response


swagger_ui = csp_update({"script-src": [NONCE], "style-src": [NONCE]})(
    SpectacularSwaggerView.as_view(url_name="schema")
)
redoc = csp_update(
    {"script-src": [NONCE], "style-src": [NONCE, *REDOC_STYLE_HASHES], "worker-src": ["blob:"]}
)(RedocView.as_view(url_name="schema"))
