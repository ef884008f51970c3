"""The web page in a real browser: headless Chromium (Debian's package, driven through chromedriver)
against the service as a process with the real job on a real Ray head.

Sign in through the form, watch a tiny experiment reach `succeeded` on the list (the page reloads
itself), open it and see its curves (SVG) and sample figure (a decoded image) drawn, open its Ray
dashboard job page, compare it with a second one, cancel that one from its page, and open a tiny
grid search's page (trials, best marked, the lambda heatmap). Screenshots of each page go to
`CDSP_SCREENSHOTS` when set (the README's pictures in docs/ come from such a run).

Chromium must be installed (`.ci/run` installs `chromium chromium-driver` with apt when missing);
`CDSP_TEST_SKIP_BROWSER=1` skips it on a developer machine without them (never in CI).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.ray_head import EmbeddedHead
from tests.service.conftest import AUTH, TOKEN
from tests.service.server import ServiceProcess

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(720)]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FINAL = ("succeeded", "failed", "cancelled")


def stage2_spec(root: Path, name: str, epochs: int) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "stage2",
        "data": {"root": str(root), "num_classes": 3, "crop_size": 64, "loader_workers": 0,
                 "pseudo_label_dir": "SegmentationClassAug"},
        "stage2": {"backbone": "resnet18", "epochs": epochs, "batch_size": 4, "warmup_epochs": 0},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }  # fmt: skip


@pytest.fixture
def browser() -> Iterator[Any]:
    if os.environ.get("CDSP_TEST_SKIP_BROWSER") == "1":
        pytest.skip("browser test skipped on request (CDSP_TEST_SKIP_BROWSER=1)")
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.fail(f"{CHROMIUM} and {DRIVER} are needed: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cdsp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shoot(driver: Any, name: str) -> None:
    folder = os.environ.get("CDSP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(max(int(height) + 40, 800), 6000))
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def wait_for(driver: Any, predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; page: {driver.page_source[-2000:]}")
        time.sleep(0.5)


def test_sign_in_follow_open_compare_and_cancel_in_chromium(
    on_shared_head: ServiceProcess, browser: Any, tiny_synth: Path, ray_head: EmbeddedHead
) -> None:
    from selenium.webdriver.common.by import By

    service = on_shared_head
    api = httpx.Client(base_url=service.url, headers=AUTH, timeout=10)
    done = api.post("/v1/experiments", json={"spec": stage2_spec(tiny_synth, "tiny-done", 2)}).json()
    t0 = time.perf_counter()

    browser.get(f"{service.url}/ui/")
    assert browser.find_element(By.ID, "token")  # signed out: the form, no data
    assert "tiny-done" not in browser.page_source
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.ID, "signin").click()
    wait_for(browser, lambda: bool(browser.find_elements(By.ID, "signin-error")), "the sign-in error", 30)
    assert "is not one of the service" in browser.find_element(By.ID, "signin-error").text
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "signin").click()
    wait_for(browser, lambda: bool(browser.find_elements(By.ID, "experiments")), "the list after sign-in", 30)
    cookie = browser.get_cookie("cdsp_token")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # The list reloads itself while the run is active: the row turns `succeeded` with no action of ours.
    def row_status() -> str:
        from selenium.common.exceptions import WebDriverException

        try:  # the page may reload between finding the row and reading it
            row = browser.find_element(By.XPATH, f"//a[@href='/ui/experiments/{done['id']}']/ancestor::tr")
            return str(row.find_element(By.CLASS_NAME, "status").text)
        except WebDriverException:
            return ""

    wait_for(browser, lambda: row_status() == "succeeded", "the experiment succeeded on the list", timeout=240)
    shoot(browser, "ui-list")
    browser.get(f"{service.url}/ui/experiments/{done['id']}")  # (its link on the list, loaded directly)
    assert browser.find_element(By.ID, "status").text == "succeeded"
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline"), "no curve drawn"
    images = browser.find_elements(By.CSS_SELECTOR, "img.figure")
    samples = [i for i in images if i.get_attribute("alt") == "samples.png"]
    assert samples, [i.get_attribute("alt") for i in images]
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", samples[0]) > 100
    assert "val mIoU" in browser.page_source and "stage2-epoch002.pt" in browser.page_source
    shoot(browser, "ui-experiment")

    # The Ray dashboard is one click away: its job page, after the dashboard's own token prompt.
    sid = api.get(f"/v1/experiments/{done['id']}").json()["ray"]["submission_id"]
    link = browser.find_element(By.ID, "ray-job").get_attribute("href")
    assert sid in link
    browser.get(link)
    assert ray_head.info is not None and ray_head.info.token
    wait_for(browser, lambda: bool(browser.find_elements(By.CSS_SELECTOR, "input[type=password]")),
             "the dashboard's token prompt", timeout=30)  # fmt: skip
    browser.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(ray_head.info.token)
    browser.find_element(By.XPATH, "//button[normalize-space()='Submit' or normalize-space()='SUBMIT']").click()
    wait_for(browser, lambda: sid in browser.page_source and "SUCCEEDED" in browser.page_source,
             "the Ray job page with its status", timeout=60)  # fmt: skip
    shoot(browser, "ray-dashboard-job")

    # A long one: compare the two, then cancel it from its page.
    long = api.post("/v1/experiments", json={"spec": stage2_spec(tiny_synth, "tiny-long", 200)}).json()
    browser.get(f"{service.url}/ui/compare?id={done['id']}&id={long['id']}")
    assert "stage2.epochs" in browser.find_element(By.ID, "differences").text
    shoot(browser, "ui-compare")
    browser.get(f"{service.url}/ui/experiments/{long['id']}")
    wait_for(browser, lambda: api.get(f"/v1/experiments/{long['id']}").json()["status"] == "running",
             "the long run started", timeout=120)  # fmt: skip
    browser.refresh()
    wait_for(browser, lambda: bool(browser.find_elements(By.ID, "cancel")), "the cancel button", 30)
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda: api.get(f"/v1/experiments/{long['id']}").json()["status"] == "cancelled",
             "cancelled from the page", timeout=90)  # fmt: skip
    browser.refresh()
    assert browser.find_element(By.ID, "status").text == "cancelled" and browser.find_elements(By.ID, "retry")

    # A tiny grid search: its page lists the trials, the best one marked, and draws the lambda heatmap.
    grid = {**stage2_spec(tiny_synth, "tiny-grid", 1), "kind": "search",
            "search": {"space": {"stage2.lambda_s": {"grid": [1.0, 2.0]}, "stage2.lambda_c": {"grid": [6.0]}},
                       "max_concurrent_trials": 1}}  # fmt: skip
    search = api.post("/v1/experiments", json={"spec": grid}).json()
    wait_for(browser, lambda: api.get(f"/v1/experiments/{search['id']}").json()["status"] in FINAL,
             "the search ended", timeout=300)  # fmt: skip
    assert api.get(f"/v1/experiments/{search['id']}").json()["status"] == "succeeded"
    browser.get(f"{service.url}/ui/experiments/{search['id']}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#trials tr")
    assert len(rows) == 3 and len(browser.find_elements(By.CSS_SELECTOR, "#trials tr.best")) == 1
    assert "mIoU over lambda_s x lambda_c" in browser.page_source
    shoot(browser, "ui-search")
    print(f"browser walk: {time.perf_counter() - t0:.1f} s")
