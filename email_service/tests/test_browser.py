"""The contact form in headless Chromium: the page, the embedded snippet on another origin, no JavaScript.

Set MEDCOR_SCREENSHOTS=docs to rewrite the README's screenshots (docs/contact-*.png) while testing.
"""

import functools
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from django.conf import settings as django_settings

from email_service.contact import wait_text
from email_service.models import EmailRequest, EmailStatus

from .conftest import free_port, skip_or_fail, wait_for
from .files import pdf_bytes
from .siteverify import SECRET as SITEVERIFY_SECRET

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
API = "/api/email/emails/"
README_ORIGIN = "https://api.medcor.example"
FORM = {
    "Full name": "Amelia Hartmann",
    "Email address": "amelia.hartmann@example.org",
    "Phone": "+49 (30) 1234-5678",
    "Job or profession": "Cardiology nurse",
    "Subject": "Question about my referral",
    "Message": "My GP referred me for an ECG. Could you confirm the appointment date?",
}
# Records, in the page, every change of a value, a disabled or a hidden attribute, as
# [element's id, or its data-mc-* attribute, or its tag; attribute; new value].
RECORDER = """
window.__changes = [];
new MutationObserver(function (mutations) {
  mutations.forEach(function (m) {
    var names = m.target.getAttributeNames().filter(function (n) { return n.indexOf("data-mc-") === 0; });
    var element = m.target.id || names[0] || m.target.tagName.toLowerCase();
    window.__changes.push([element, m.attributeName, m.target.getAttribute(m.attributeName)]);
  });
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["value", "disabled", "hidden"]});
"""


@pytest.fixture(autouse=True)
def _no_minimum_fill_time(settings):
    # Playwright fills the whole form in well under EMAIL_MIN_FILL_SECONDS, as only a bot would;
    # test_honeypot.py covers the fill time itself.
    settings.EMAIL_MIN_FILL_SECONDS = 0


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} is missing (Debian's chromium package)")
    try:
        from playwright import sync_api
    except ImportError:
        skip_or_fail("Playwright for Python is not installed (requirements.txt)")
    with pytest.MonkeyPatch.context() as patch:
        # Playwright's sync API keeps its asyncio loop marked as running on this thread, which
        # makes Django refuse ORM calls; the calls made here are plain synchronous ones.
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_api.sync_playwright() as playwright:
            chromium = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"]
            )
            yield chromium
            chromium.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 900, "height": 1000})
    context.set_default_timeout(15_000)
    yield context
    context.close()


@pytest.fixture
def page(context):
    page = context.new_page()
    page.add_init_script(RECORDER)
    return page


def screenshot(page, name):
    folder = os.environ.get("MEDCOR_SCREENSHOTS")
    if folder:
        path = Path(django_settings.BASE_DIR) / folder / f"contact-{name}.png"
        page.screenshot(path=str(path), full_page=True)


def fill_form(page, **overrides):
    for label, value in {**FORM, **overrides}.items():
        page.get_by_label(label).fill(value)


def attach(page, name, content, mime_type="application/pdf"):
    page.get_by_label("Attachment").set_input_files({"name": name, "mimeType": mime_type, "buffer": content})


def submit_button(page):
    return page.get_by_role("button", name="Send message")


def reference(page):
    locator = page.locator("[data-mc-reference]")
    locator.wait_for(state="visible")
    return locator.inner_text()


def changes(page, element, attribute):
    """The values `attribute` of `element` took, in order (None: removed), as RECORDER saw them."""
    recorded = page.evaluate("window.__changes")
    return [value for seen, name, value in recorded if (seen, name) == (element, attribute)]


def test_pdf_submission_shows_progress_reference_and_status_until_sent_and_the_mail_has_the_file(
    celery_worker, live_server, smtp, settings, page
):
    from playwright.sync_api import expect

    pdf = pdf_bytes("Referral from Dr. Weber")
    page.goto(f"{live_server.url}/contact/")
    fill_form(page)
    attach(page, "Referral letter.pdf", pdf)
    screenshot(page, "form")
    submit_button(page).click()

    pk = reference(page)
    status = page.locator("[data-mc-status]")
    expect(status).to_have_text("Delivered to our support team", timeout=30_000)
    expect(page.locator("[data-mc-live]")).to_have_text(re.compile("Delivered to our support team"))
    expect(page.locator("[data-mc-result] h2")).to_be_focused()
    screenshot(page, "sent")

    # The bar was shown while the file went up, rose to 100 and gave way to the result.
    assert changes(page, "data-mc-progress", "hidden") == [None, ""]
    values = [float(value) for value in changes(page, "mc-progress", "value")]
    assert values and values == sorted(values) and values[-1] == 100
    expect(page.get_by_role("progressbar")).to_be_hidden()
    # Disabled while sending, enabled again once the answer came.
    assert changes(page, "button", "disabled")[:2] == ["", None]

    row = EmailRequest.objects.get(pk=pk)
    assert row.status == EmailStatus.SENT
    assert (row.full_name, row.attachment_name) == (FORM["Full name"], "Referral letter.pdf")
    [received] = wait_for(lambda: smtp.to(settings.SUPPORT_EMAIL), message="the support mail")
    mail = received["message"]
    assert mail["X-Email-Request-ID"] == pk
    assert mail["Reply-To"] == FORM["Email address"]
    [attachment] = list(mail.iter_attachments())
    assert attachment.get_filename() == "Referral letter.pdf"
    assert attachment.get_content() == pdf


def test_bad_email_and_disallowed_file_show_errors_next_to_their_fields_and_store_nothing(
    live_server, page, dispatched, media_root
):
    from playwright.sync_api import expect

    page.goto(f"{live_server.url}/contact/")
    fill_form(page, **{"Email address": "amelia.hartmann-at-example.org"})
    attach(page, "setup.exe", b"MZ\x90\x00\x03" + bytes(300), "application/octet-stream")
    submit_button(page).click()

    email_error = page.locator("#mc-email-error")
    expect(email_error).to_contain_text("Enter a valid email address.")
    expect(page.locator("#mc-file_attached-error")).to_contain_text("Allowed:")
    expect(page.get_by_label("Email address")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Email address")).to_be_focused()
    expect(page.get_by_role("alert")).to_contain_text("Please correct the fields marked below.")
    # The message is tied to its field for screen readers.
    assert "mc-email-error" in page.get_by_label("Email address").get_attribute("aria-describedby")
    expect(page.get_by_label("Full name")).not_to_have_attribute("aria-invalid", "true")
    expect(submit_button(page)).to_be_enabled()
    screenshot(page, "errors")
    assert EmailRequest.objects.count() == 0

    # Corrected, the same form goes through and the errors go away.
    page.get_by_label("Email address").fill("amelia.hartmann@example.org")
    attach(page, "Referral.pdf", pdf_bytes())
    submit_button(page).click()
    assert EmailRequest.objects.filter(pk=reference(page)).exists()
    expect(email_error).to_be_hidden()


def test_double_click_on_submit_creates_one_request(live_server, page, dispatched, media_root):
    posts = []
    page.on("request", lambda request: posts.append(request) if request.method == "POST" else None)
    page.goto(f"{live_server.url}/contact/")
    fill_form(page)
    attach(page, "Referral.pdf", pdf_bytes())
    submit_button(page).dblclick()

    pk = reference(page)
    assert [str(value) for value in EmailRequest.objects.values_list("pk", flat=True)] == [pk]
    assert len(posts) == 1


def test_retry_after_a_lost_answer_reuses_the_key_and_creates_one_request(
    live_server, page, dispatched, media_root
):
    from playwright.sync_api import expect

    keys = []

    def lose_first_answer(route):
        keys.append(route.request.headers["idempotency-key"])
        if len(keys) == 1:
            route.fetch()  # the server stores the request...
            route.abort("connectionreset")  # ...but its answer never reaches the browser
        else:
            route.continue_()

    page.route(f"{live_server.url}{API}", lose_first_answer)
    page.goto(f"{live_server.url}/contact/")
    fill_form(page)
    submit_button(page).click()

    expect(page.get_by_role("alert")).to_contain_text("We could not reach our server")
    assert EmailRequest.objects.count() == 1
    page.get_by_role("button", name="Retry").click()

    pk = reference(page)
    assert len(keys) == 2 and keys[0] == keys[1]
    assert [str(value) for value in EmailRequest.objects.values_list("pk", flat=True)] == [pk]


def test_429_is_shown_with_the_time_to_wait(live_server, page, settings, dispatched, media_root):
    from playwright.sync_api import expect

    settings.RATELIMIT_ENABLE = True
    # A day-long window, so the limit cannot reset between the two posts.
    settings.EMAIL_RATELIMIT_CREATE = "1/d"
    requests.post(f"{live_server.url}{API}", json={"full_name": "A", "email": "a@example.org"}, timeout=10)
    page.goto(f"{live_server.url}/contact/")
    fill_form(page)
    with page.expect_response(f"{live_server.url}{API}") as answer:
        submit_button(page).click()
    assert answer.value.status == 429
    wait = int(answer.value.headers["retry-after"])
    expect(page.get_by_role("alert")).to_have_text(
        f"You have sent several messages in a short time. Please try again in {wait_text(wait)}."
    )
    expect(submit_button(page)).to_be_disabled()
    # Names are encrypted at rest, so compared after reading: the refused form left no row.
    assert FORM["Full name"] not in [row.full_name for row in EmailRequest.objects.all()]


# --- the embedded snippet, served from a second origin ----------------------------------------


def readme_snippet():
    """The embeddable snippet from the README's section on the contact form."""
    readme = (Path(django_settings.BASE_DIR) / "README.md").read_text()
    section = readme.split("## The contact form", 1)[1]
    return re.search(r"```html\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def website(live_server, tmp_path):
    """The README's snippet pasted into a page served by a plain web server on another port."""
    root = tmp_path / "website"
    root.mkdir()
    snippet = readme_snippet().replace(README_ORIGIN, live_server.url)
    (root / "index.html").write_text(
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>MedCor</title></head>\n'
        f"<body><h1>Contact us</h1>\n{snippet}</body></html>\n"
    )
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_snippet_on_an_allowed_origin_posts_cross_origin_without_cookies(
    live_server, website, context, settings, dispatched, media_root
):
    from playwright.sync_api import expect

    settings.CORS_ALLOWED_ORIGINS = [website]
    page = context.new_page()
    # A cookie of the API's origin exists in this browser, and must not be sent by the form.
    page.goto(f"{live_server.url}/contact/")
    assert any(cookie["name"] == "csrftoken" for cookie in context.cookies(live_server.url))

    page.goto(f"{website}/")
    fill_form(page)
    attach(page, "Referral.pdf", pdf_bytes())
    with page.expect_request(f"{live_server.url}{API}") as sent:
        submit_button(page).click()
    pk = reference(page)
    headers = sent.value.all_headers()
    assert headers["origin"] == website
    assert "cookie" not in headers
    expect(page.locator("[data-mc-status]")).to_have_text("Queued for delivery")
    expect(page.get_by_role("alert")).to_be_hidden()
    row = EmailRequest.objects.get(pk=pk)
    assert (row.full_name, row.attachment_name) == (FORM["Full name"], "Referral.pdf")


def test_snippet_on_a_disallowed_origin_is_blocked_by_the_browser(
    live_server, website, page, settings, dispatched, media_root
):
    from playwright.sync_api import expect

    settings.CORS_ALLOWED_ORIGINS = ["http://127.0.0.1:1"]
    page.goto(f"{website}/")
    fill_form(page)
    submit_button(page).click()
    expect(page.get_by_role("alert")).to_contain_text("We could not reach our server")
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    # The preflight was refused, so the POST itself never left the browser.
    assert EmailRequest.objects.count() == 0


# --- without JavaScript ------------------------------------------------------------------------


@pytest.fixture
def page_without_javascript(browser):
    context = browser.new_context(java_script_enabled=False)
    context.set_default_timeout(15_000)
    yield context.new_page()
    context.close()


def test_form_works_with_javascript_disabled(live_server, page_without_javascript, dispatched, media_root):
    from playwright.sync_api import expect

    page = page_without_javascript
    page.goto(f"{live_server.url}/contact/")
    fill_form(page)
    attach(page, "Referral letter.pdf", pdf_bytes())
    submit_button(page).click()

    expect(page.get_by_role("heading", name="Thank you, we have your message")).to_be_visible()
    row = EmailRequest.objects.get()
    assert page.locator("[data-mc-reference]").inner_text() == str(row.pk)
    assert page.url == f"{live_server.url}/contact/sent/{row.pk}/"
    assert (row.full_name, row.attachment_name) == (FORM["Full name"], "Referral letter.pdf")


def test_errors_are_shown_next_to_their_fields_with_javascript_disabled(
    live_server, page_without_javascript, dispatched, media_root
):
    from playwright.sync_api import expect

    page = page_without_javascript
    page.goto(f"{live_server.url}/contact/")
    fill_form(page, Phone="call me maybe")
    attach(page, "notes.txt.exe", b"MZ\x90\x00\x03" + bytes(300), "application/octet-stream")
    submit_button(page).click()

    expect(page.locator("#mc-phone-error")).to_contain_text("Enter a phone number")
    expect(page.locator("#mc-file_attached-error")).to_contain_text("Allowed:")
    expect(page.get_by_label("Phone")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Full name")).to_have_value(FORM["Full name"])
    assert EmailRequest.objects.count() == 0


# --- the CAPTCHA widget ---------------------------------------------------------------------

# Stands in for Turnstile's api.js (no network here): each rendering or reset gives a new token,
# in a hidden input under the provider's field name inside the widget, as the real one does.
FAKE_TURNSTILE = """
(function () {
  var issued = 0;
  function render(box) {
    var input = box.querySelector('input[name="cf-turnstile-response"]');
    if (!input) {
      input = document.createElement("input");
      input.type = "hidden";
      input.name = "cf-turnstile-response";
      box.appendChild(input);
    }
    issued += 1;
    input.value = "token-" + issued;
  }
  window.turnstile = { reset: function (box) { render(box || document.querySelector(".cf-turnstile")); } };
  Array.prototype.forEach.call(document.querySelectorAll(".cf-turnstile"), render);
})();
"""


def test_a_refused_captcha_is_shown_at_the_widget_which_gets_a_new_token_that_goes_through(
    live_server, page, settings, siteverify, dispatched, media_root
):
    from playwright.sync_api import expect

    settings.EMAIL_CAPTCHA_PROVIDER = "turnstile"
    settings.EMAIL_CAPTCHA_SITE_KEY = "stand-in-site-key"
    settings.EMAIL_CAPTCHA_SECRET = SITEVERIFY_SECRET
    settings.EMAIL_CAPTCHA_VERIFY_URL = siteverify.url
    siteverify.good = {"token-2"}  # the first token the widget gives is refused, the next passes
    page.route(
        "https://challenges.cloudflare.com/**",
        lambda route: route.fulfill(status=200, content_type="application/javascript", body=FAKE_TURNSTILE),
    )
    page.goto(f"{live_server.url}/contact/")
    fill_form(page)
    submit_button(page).click()

    error = page.locator('[data-error-for="cf-turnstile-response"]')
    expect(error).to_have_text("The CAPTCHA check failed or expired; please complete it again.")
    expect(page.get_by_role("alert")).to_contain_text("Please correct the fields marked below.")
    assert EmailRequest.objects.count() == 0
    expect(page.locator('input[name="cf-turnstile-response"]')).to_have_value("token-2")

    submit_button(page).click()
    row = EmailRequest.objects.get(pk=reference(page))
    assert row.captcha_unverified is False
    assert [call["body"].count("response=token-") for call in siteverify.calls] == [1, 1]
    assert "response=token-2" in siteverify.calls[-1]["body"]
