"""The staff origin in headless Chromium with the rest of the web cut off: docs and admin still work.

Every request that is not to the live server is aborted and recorded, and every Content-Security-
Policy violation is collected from the page; a page that needed a CDN, or an inline script the
policy refuses, would show up in one list or the other.
"""

import pytest

from .test_browser import browser  # noqa: F401 (the fixture: Debian's Chromium under Playwright)

pytestmark = pytest.mark.browser

# Collects each violation the browser reports to the page, including those of workers it starts.
VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", function (event) {
  window.__violations.push(event.violatedDirective + " " + event.blockedURI + " " + event.sample + " " + event.sourceFile + ":" + event.lineNumber);
});
"""


class Watched:
    """A browser context whose requests outside `origin` are aborted and whose errors are kept."""

    def __init__(self, chromium, origin):
        self.origin = origin
        self.blocked, self.errors = [], []
        self.context = chromium.new_context(viewport={"width": 1200, "height": 1000})
        self.context.set_default_timeout(20_000)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.add_init_script(VIOLATIONS)
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _route(self, route):
        url = route.request.url
        if url == self.origin or url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def violations(self):
        return self.page.evaluate("window.__violations")

    def assert_clean(self):
        assert self.blocked == [], "requests outside the service"
        assert self.violations() == [], f"Content-Security-Policy violations: {self.violations()}"
        assert self.errors == [], "console errors"


@pytest.fixture
def watched(browser, live_server):  # noqa: F811 (the fixture imported above)
    watched = Watched(browser, live_server.url)
    yield watched
    watched.context.close()


def test_swagger_ui_renders_the_operations_from_the_service_alone(watched, live_server):
    from playwright.sync_api import expect

    response = watched.page.goto(f"{live_server.url}/api/docs/")
    assert "'nonce-" in response.headers["content-security-policy"]
    operations = watched.page.locator(".opblock")
    expect(operations.first).to_be_visible()
    expect(
        watched.page.locator(".opblock-summary-path", has_text="/api/email/emails/{id}/cancel/")
    ).to_be_visible()
    assert operations.count() >= 8
    # Opening an operation renders its parameters and responses, all of it from the loaded schema.
    watched.page.locator(".opblock-summary", has_text="/api/email/emails/statistics/").click()
    expect(watched.page.locator(".responses-table").first).to_be_visible()
    watched.assert_clean()


def test_redoc_renders_the_operations_from_the_service_alone(watched, live_server):
    from playwright.sync_api import expect

    watched.page.goto(f"{live_server.url}/api/redoc/")
    expect(watched.page.locator("h1", has_text="MedCor email service")).to_be_visible()
    operations = watched.page.locator("[data-section-id^='operation/']")
    expect(operations.first).to_be_attached()
    assert operations.count() >= 8
    # The search box runs in ReDoc's worker, which the policy lets it start from a blob.
    watched.page.get_by_placeholder("Search...").fill("cancel")
    expect(watched.page.locator("[data-role='search:results'] li").first).to_be_visible()
    watched.assert_clean()


def test_the_admin_works_under_its_policy(watched, live_server, django_user_model, settings):
    from playwright.sync_api import expect

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    root = django_user_model.objects.create_superuser("root.admin", password="correct horse battery staple")
    page = watched.page
    page.goto(f"{live_server.url}/admin/")
    page.get_by_label("Username").fill("root.admin")
    page.get_by_label("Password").fill("correct horse battery staple")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Site administration")).to_be_visible()

    # Enrolling a TOTP device: the add form's scripts, then the page with its QR code.
    page.goto(f"{live_server.url}/admin/otp_totp/totpdevice/add/")
    page.get_by_label("User").fill(str(root.pk))
    page.get_by_label("Name").fill("phone")
    page.get_by_role("button", name="Save", exact=True).click()
    page.get_by_role("link", name="qrcode").first.click()
    qr = page.locator("img.qrcode-image")
    expect(qr).to_be_visible()
    # Visible is not loaded: an <img> has its box before its bytes arrive. decode() settles once the
    # picture is loaded and decoded, and rejects if it could not be.
    assert qr.evaluate("image => image.decode().then(() => image.naturalWidth)") > 0
    watched.assert_clean()
