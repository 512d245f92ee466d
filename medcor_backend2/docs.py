"""The API's Swagger UI and ReDoc pages under the service's Content-Security-Policy.

Both pages load their bundles from the service's own static files (drf-spectacular-sidecar); the
one inline script and style of each page carry this response's nonce (templates/drf_spectacular/),
so no 'unsafe-inline' is needed. ReDoc is handed the nonce for the styles it injects, and runs
its search index in a worker it makes from a blob.
"""

from csp.constants import NONCE
from csp.decorators import csp_update
from drf_spectacular.views import SpectacularRedocView, SpectacularSwaggerView

swagger_ui = csp_update({"script-src": [NONCE], "style-src": [NONCE]})(
    SpectacularSwaggerView.as_view(url_name="schema")
)
redoc = csp_update({"script-src": [NONCE], "style-src": [NONCE], "worker-src": ["blob:"]})(
    SpectacularRedocView.as_view(url_name="schema")
)
