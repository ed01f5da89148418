"""The admin in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``
packages; ``.ci/run`` installs them) driven by Selenium against pytest-django's live server.

An admin logs in, pays an invoice with its button, sees it paid and the history row with its
fencing token and actor; then, while another process holds the invoice's lease, a click shows a
clear message, not an error page. ``DSM_ADMIN_SCREENSHOT=docs/admin-change-form.png`` saves the
change form as the README shows it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import start_worker
from tests.testapp.models import Invoice

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The machine's network may be closed: nothing in the browser may reach out for updates or sync.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1100",
]
BOUND = 60  # seconds: bounds every wait of the browser (never asserted)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does as root)",
    ),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(BOUND)
    try:
        yield driver
    finally:
        driver.quit()


def test_an_admin_pays_an_invoice_in_a_browser_and_sees_a_busy_one_refused(live_server, browser, django_user_model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for_text(selector: str, text: str) -> None:
        WebDriverWait(browser, BOUND).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, selector), text))

    django_user_model.objects.create_superuser("ada", "ada@example.com", "secret-pw")
    invoice = Invoice.objects.create()
    change = f"/admin/testapp/invoice/{invoice.pk}/change/"
    browser.get(f"{live_server.url}/admin/login/?next={change}")
    browser.find_element(By.NAME, "username").send_keys("ada")
    browser.find_element(By.NAME, "password").send_keys("secret-pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for_text("#dsm-machine-machine .dsm-state", "New")

    pay = browser.find_element(By.ID, "dsm-edge-machine-pay")
    pay.find_element(By.NAME, "amount").send_keys("42")
    pay.find_element(By.NAME, "_transition").click()  # a POST with the form's CSRF token

    wait_for_text("#dsm-machine-machine .dsm-state", "Paid")
    wait_for_text(".messagelist", f"{invoice}: pay: New → Paid.")
    record = invoice.machine.history()[0]
    row = browser.find_element(By.CSS_SELECTOR, "#dsm-history-machine tr.dsm-record")  # the newest
    assert row.find_element(By.CSS_SELECTOR, ".dsm-record-edge").text == "pay"
    assert row.find_element(By.CSS_SELECTOR, ".dsm-record-token").text == str(record.fencing_token)
    assert row.find_element(By.CSS_SELECTOR, ".dsm-record-actor").text == "ada"

    holder = start_worker("tests.workers:hold_forever", invoice.pk, "testapp.Invoice")
    try:
        token = holder.expect()
        browser.get(f"{live_server.url}{change}")
        wait_for_text(".dsm-lease", f"fencing token {token}")
        browser.find_element(By.ID, "dsm-edge-machine-ship").find_element(By.NAME, "_transition").click()
        wait_for_text(".messagelist .error", "another process holds this object's lease")
        assert browser.find_element(By.CSS_SELECTOR, "#dsm-machine-machine .dsm-state").text == "Paid"
        if os.environ.get("DSM_ADMIN_SCREENSHOT"):
            browser.save_screenshot(os.environ["DSM_ADMIN_SCREENSHOT"])
    finally:
        holder.stop()
    assert Invoice.objects.get(pk=invoice.pk).status == "paid"
