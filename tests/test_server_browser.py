"""The web page in a real browser (headless Debian chromium through chromedriver and Selenium): type a prompt,
press Generate, watch the progress bar move, see the image and its parameters.

Set SERVER_SCREENSHOT=path to keep the page's screenshot there (README's assets/server.png is made so)."""

import os
import shutil
import time

import pytest

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from test_server_process import start_server, stop_server  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
PROMPT = "a green square on a white background"


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,740"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.03)
    raise AssertionError(f"timed out waiting for {what}")


def test_generate_from_the_page(browser, tmp_path):
    process, url = start_server()
    try:
        browser.get(url + "/")
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#sampler_name option"), 30, "the samplers")
        model = wait_until(lambda: browser.find_element(By.ID, "model").text, 30, "the model's name")
        assert "shapes/model.safetensors" in model
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys(PROMPT)
        for field, value in (("steps", "80"), ("seed", "1234")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()

        widths = []

        def finished() -> bool:
            widths.append(
                browser.execute_script("return parseFloat(document.getElementById('fill').style.width)")
            )
            return bool(browser.find_elements(By.CSS_SELECTOR, "#results figure img"))

        wait_until(finished, 300, "the image")
        moving = [w for w in widths if w == w and 0 < w < 100]  # w == w: not NaN (no width yet)
        assert len(set(moving)) >= 2, f"the progress bar did not move: {widths}"
        assert moving == sorted(moving)
        image = browser.find_element(By.CSS_SELECTOR, "#results figure img")
        wait_until(
            lambda: browser.execute_script("return arguments[0].naturalWidth", image) == 64, 10, "decoding"
        )
        caption = browser.find_element(By.CSS_SELECTOR, "#results figcaption").text
        assert (
            caption.startswith(PROMPT) and "Seed: 1234" in caption and "Steps: 80" in caption
        )  # A1111 infotext
        assert "Done: 1 image" in browser.find_element(By.ID, "status").text
        wait_until(lambda: browser.find_element(By.ID, "generate").is_enabled(), 10, "the button back")
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(tmp_path / "server.png"))
        if os.environ.get("SERVER_SCREENSHOT"):
            shutil.copy(tmp_path / "server.png", os.environ["SERVER_SCREENSHOT"])
    finally:
        stop_server(process)
