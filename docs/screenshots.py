"""Take the README's admin screenshots with headless Chromium (Playwright driving the system browser).

python manage.py seed_demo && python manage.py createsuperuser   # once, with make run going
pip install playwright   # only the Python package: the browser is the system's /usr/bin/chromium
python docs/screenshots.py http://127.0.0.1:8000 USERNAME PASSWORD
"""

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

PAGES = {
    "admin-changelist.png": "/admin/email_service/emailrequest/",
    "admin-statistics.png": "/admin/email_service/emailrequest/statistics/",
}


HERE = Path(__file__).resolve().parent


def main(base_url, username, password, out=HERE):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        # The admin's navigation sidebar closed, as its toggle leaves it: more room for the table.
        page.add_init_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
        page.goto(f"{base_url}/admin/login/")
        page.fill("#id_username", username)
        page.fill("#id_password", password)
        page.click("input[type=submit]")
        page.wait_for_url(f"{base_url}/admin/")
        for name, url in PAGES.items():
            page.goto(base_url + url)
            page.screenshot(path=out / name, full_page=name != "admin-changelist.png")
            print(f"wrote {out / name}")
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
