"""The screenshots in docs/console/, taken from a running server's console with headless Chromium.

    loradock --home H serve --http-port 8000 --auth-token-file T --allow-adapter-updates
    .venv/bin/python docs/console/take_screenshots.py --url http://127.0.0.1:8000 --token-file T \\
        --version quillfeather@3 --models smollm2-135m-instruct veloria quillfeather \\
        --prompt "When did the first settlers arrive in Kaskarra?" --prompt "What does the Mopwright 3 cost?"

Needs chromium and chromium-driver (`make test` installs them as root with apt) and selenium
(the test extra).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def save(driver: webdriver.Chrome, out: Path, name: str, width: int = 1280) -> None:
    """The whole page at `width` CSS pixels (a phone's, with its viewport rules, below 500)."""
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 500}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": min(height, 3200)})
    driver.save_screenshot(str(out / f"{name}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"{out / name}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--token-file", type=Path, help="the server's --auth-token-file")
    p.add_argument("--version", required=True, help="the version page to show, NAME@N")
    p.add_argument("--models", nargs="+", required=True, help="playground models, side by side")
    p.add_argument("--prompt", required=True, action="append",
                   help="a playground prompt (again for more: playground.png, playground-2.png, ...)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = p.parse_args()
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "chromium"
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))
    wait = WebDriverWait(driver, 300)
    try:
        if args.token_file:
            driver.get(f"{args.url}/ui/login")
            driver.find_element(By.ID, "token").send_keys(args.token_file.read_text().strip())
            driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
            wait.until(lambda d: "/ui/adapters" in d.current_url)
        driver.get(f"{args.url}/ui/adapters")
        save(driver, args.out, "adapters")
        save(driver, args.out, "adapters-phone", width=390)
        name, _, number = args.version.rpartition("@")
        driver.get(f"{args.url}/ui/adapters/{name}/{number}")
        save(driver, args.out, "version")
        for i, prompt in enumerate(args.prompt):
            driver.get(f"{args.url}/ui/playground")
            for box in driver.find_elements(By.CSS_SELECTOR, "input[name=model]"):
                if box.is_selected() != (box.get_attribute("value") in args.models):
                    box.click()
            driver.find_element(By.ID, "prompt").send_keys(prompt)
            tokens = driver.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys(str(args.max_tokens))
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answer") and all(
                c.get_attribute("data-state") != "streaming" for c in d.find_elements(By.CSS_SELECTOR, ".answer")))
            if i == 0:
                driver.find_element(By.CSS_SELECTOR, "#code summary").click()
            save(driver, args.out, "playground" if i == 0 else f"playground-{i + 1}")
        driver.get(f"{args.url}/ui/serving")
        time.sleep(3)  # one live refresh
        save(driver, args.out, "serving")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
