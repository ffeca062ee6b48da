"""Headless Chromium for the web page's tests (Selenium driving the Debian ``chromium`` + ``chromium-driver``).

Tests call :func:`chrome` and get a driver, or a skip that says what is missing and how to install it
(``.ci/run`` installs both packages when it runs as root with apt). Selenium is told where both binaries are,
so it never tries to download a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

INSTALL_HINT = ("install them with `apt-get install -y chromium chromium-driver` (as root; .ci/run does) and "
                "`pip install selenium` (the dev extra)")


def _find(env: str, *names: str) -> str | None:
    explicit = os.environ.get(env)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def chromium_paths() -> tuple[str, str]:
    """(browser, driver) paths, or a pytest skip naming what is missing."""
    browser = _find("MEDRWR_CHROMIUM", "/usr/bin/chromium", "chromium", "chromium-browser")
    driver = _find("MEDRWR_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
    missing = [n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None]
    if missing:
        pytest.skip(f"real-browser test needs {' and '.join(missing)}: {INSTALL_HINT}")
    return browser, driver


def require_browser() -> tuple[str, str]:
    """Skip now (before any expensive fixture) unless selenium, chromium and chromedriver are all there."""
    pytest.importorskip("selenium", reason=f"real-browser test needs selenium: {INSTALL_HINT}")
    return chromium_paths()


def chrome(width: int = 1440, height: int = 1000):
    """A headless Chromium WebDriver at ``width`` x ``height`` CSS pixels; the caller quits it."""
    browser, driver = require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not reach the network
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--force-device-scale-factor=1",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def console_errors(driver) -> list[str]:
    """The page's console messages at level SEVERE (JavaScript errors, failed loads)."""
    from selenium.common.exceptions import WebDriverException

    try:
        return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    except WebDriverException:  # pragma: no cover - a driver without the log endpoint
        return []


def full_page_screenshot(driver, path: Path) -> Path:
    """Save the whole page (not just the viewport) as a PNG: grow the window to the document's height first."""
    size = driver.get_window_size()
    chrome_px = size["height"] - int(driver.execute_script("return window.innerHeight"))
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(size["width"], min(max(height + chrome_px, 600), 4000))
    driver.execute_script("window.scrollTo(0, 0)")
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
