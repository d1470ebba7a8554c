"""The web page in a real headless Chromium (the distribution's package, driven by Selenium): the key,
a streamed chat answer, the node map, and a node killed mid-answer showing up as a recovery.

It saves the page as a screenshot: in the test's temporary folder, or where SWARM_SCREENSHOT says
(`SWARM_SCREENSHOT=docs/images/web-page.png` refreshes the one in the docs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from http_swarm import KEY, call, running_swarm

SCREENSHOT = os.environ.get("SWARM_SCREENSHOT")


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("the web page test needs Chromium and its driver: apt-get install -y chromium chromium-driver "
                    "(scripts/test.sh installs them)")
    return browser, driver


@pytest.fixture(scope="module")
def page_swarm(tmp_path_factory):
    yield from running_swarm(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, what, timeout: float = 60, message: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: what(d), message)


def _answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def _ask(driver, text: str, max_tokens: int, temperature: str = "0") -> None:
    for field, value in (("max-tokens", str(max_tokens)), ("temperature", temperature)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()


def test_the_page_chats_shows_the_swarm_and_a_recovery_as_it_happens(page_swarm, browser, tmp_path):
    browser.get(page_swarm.url + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None,
          message="the page did not ask for the key")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "key-ok").click()
    assert browser.execute_script("return sessionStorage.getItem('swarm-key')") == KEY

    # The node map: three nodes, three spans of the route covering the 30 layers in order.
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes .node")) == 3, message="no node map")
    spans = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#route .span")]
    assert [s.split()[1] for s in spans] == ["0:10", "10:20", "20:30"], spans
    assert "memory" in browser.find_element(By.ID, "nodes").text

    # A streamed answer: greedy, so it must be the API's own blocking answer to the same question.
    question = "Name three animals that live on farms."
    expected = call(page_swarm.url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0}, key=KEY
    )[1]["choices"][0]["message"]["content"]
    _ask(browser, question, 40)
    done = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"), message="no answer")
    assert done[0].text.startswith(expected.strip()), (done[0].text, expected)
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")

    # Stop mid-answer: the answer ends there and the session is freed.
    browser.find_element(By.ID, "new-chat").click()
    _ask(browser, "Tell me a very long story about a dragon.", 300)
    _wait(browser, lambda d: len(_answers(d)) == 1 and len(_answers(d)[0].text) > 20, message="no streaming answer")
    browser.find_element(By.ID, "stop").click()
    stopped = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"), 10,
                    message="stop did not end the answer")[0]
    assert stopped.text.endswith("stopped")
    deadline = time.monotonic() + 15
    while call(page_swarm.url + "/v1/swarm/status", key=KEY)[1]["sessions"]:
        assert time.monotonic() < deadline, "the stopped answer's session is still running"
        time.sleep(0.2)

    # A long answer, and the middle node killed while it streams: the page shows the recovery and the
    # answer goes on to its end.
    browser.find_element(By.ID, "new-chat").click()
    _ask(browser, "Tell me a very long story about a llama who travels around the world.", 300)
    _wait(browser, lambda d: len(_answers(d)) == 1 and len(_answers(d)[0].text) > 40, message="no streaming answer")
    _wait(browser, lambda d: "no session" not in d.find_element(By.ID, "sessions").text, 10,
          message="the running session is not shown")
    before = len(_answers(browser)[0].text)
    middle = page_swarm.procs[1]  # node0, layers 10:20
    middle.p.kill()
    middle.p.wait(10)
    recovery = _wait(browser, lambda d: [li for li in d.find_elements(By.CSS_SELECTOR, "#recoveries li.recovery")
                                         if "node0" in li.text], 60, message="the recovery did not appear")[0]
    assert "10:20" in recovery.text and "stall" in recovery.text, recovery.text
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"), 120,
          message="the answer did not finish after the recovery")
    assert len(_answers(browser)[0].text) > before
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), browser.find_element(By.ID, "messages").text
    time.sleep(1.2)  # one more poll: the node map after the recovery
    assert browser.save_screenshot(str(Path(SCREENSHOT).resolve() if SCREENSHOT else tmp_path / "web-page.png"))

    # `swarm status` in the terminal shows what the page shows: the route, each node, the recovery.
    page_nodes = [n.get_attribute("data-name") for n in browser.find_elements(By.CSS_SELECTOR, "#nodes .node")]
    page_route = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#route .span")]
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--coordinator", page_swarm.address, "--key",
                           KEY], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    route = next(x for x in lines if x.startswith("route: "))
    assert [x.split(" on ")[0] for x in route[len("route: "):].split(" -> ")] == [x.split()[1] for x in page_route]
    for name in page_nodes:
        assert any(x.split()[:1] == [name] and "GB" in x for x in lines), (name, done.stdout)
    (line,) = [x for x in lines if x.startswith("recovery ")]
    assert "node node0" in line and "10:20" in line and "path " in line and "stall" in line, line
