"""The web console in a real browser (headless Chromium from Debian's chromium + chromium-driver) against the
real Serve app with the tiny model, no mocked API: a key first, a streamed answer, an adapter version, a bad
upload's line number, a fine-tuning job to its loss curve, a promotion moving the alias, and a tenant that
cannot see another's adapter. Screenshots of every page go to docs/console/ (the README shows them)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from llmaas.deployments.config import AppConfig
from llmaas.deployments.llm_server import LLMServer
from llmaas.deployments.router import Router
from llmaas.deployments.tokenizer import Tokenizer
from tests.integration.test_finetuning_api import EXAMPLES, EXT
from tests.models import make_peft_adapter

KEYS = {"acme": "sk-console-acme-0123456789abcdef01", "bob": "sk-console-bob-0123456789abcdef012",
        "ops": "sk-console-ops-0123456789abcdef012"}
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
from tests.integration.conftest import release_root_actors


@pytest.fixture(scope="module")
def console(ray_cluster, app_args, tiny_chat_dir, tmp_path_factory):
    cfg = AppConfig.model_validate({
        **app_args, "storage_root": str(tmp_path_factory.mktemp("console-storage")),
        "auth": {"api_keys": [{"key": KEYS[t], "tenant": t, "admin": t == "ops"} for t in KEYS]}})
    serve.run(Router.bind(Tokenizer.bind(cfg), LLMServer.options(ray_actor_options={"num_cpus": 0.5}).bind(cfg),
                          cfg), name="console-app", route_prefix="/con")
    url = f"{ray_cluster}/con"
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    work = tmp_path_factory.mktemp("console-adapters")
    ops = {"Authorization": f"Bearer {KEYS['ops']}"}
    for name, owner, seed in (("tone", "acme", 1), ("tone", "acme", 2), ("secret", "bob", 3)):
        r = httpx.post(f"{url}/v1/adapters", headers=ops, timeout=120, json={
            "name": name, "owner": owner, "promote": seed == 1,
            "path": make_peft_adapter(base, work / f"{name}{seed}", seed=seed)})
        assert r.status_code == 200, r.text
    yield url
    serve.delete("console-app")
    release_root_actors(cfg.storage_root)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:  # the setup installs both (make setup / .ci/run): their absence is a bug
        pytest.fail("chromium and chromedriver are not installed: run `make setup` (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 30.0):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:  # say what the page showed instead
        raise AssertionError(driver.execute_script(
            "return location.hash + ' | ' + document.body.innerText.slice(0, 800)")) from None


def text(driver, id_: str) -> str:
    return driver.find_element("id", id_).text


def sign_in(driver, url: str, who: str) -> None:
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{url}/ui/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{url}/ui/#playground")
    wait(driver, lambda d: d.find_element("id", "page-key").is_displayed())
    assert not driver.find_element("id", "nav").is_displayed()  # nothing but the key prompt without a key
    assert driver.switch_to.active_element.get_attribute("id") == "key-input"  # the keyboard starts there
    driver.switch_to.active_element.send_keys(KEYS[who], Keys.ENTER)
    wait(driver, lambda d: d.find_element("id", "page-playground").is_displayed())


def rows(driver, column: str = "serves") -> dict[str, str]:
    """A column of the models table as the page shows it now, by model (read in one go: the page redraws it
    every second)."""
    return driver.execute_script("return Object.fromEntries([...document.querySelectorAll('#models tbody tr')]"
                                 f".map(r => [r.dataset.model, r.querySelector('td.{column}').textContent]))")


def confirmed(driver, css: str, change, answer: str | None = None) -> float:
    """Activates a models-page button from the keyboard (Enter on it), answers its dialogs (a value for a prompt,
    then OK), and returns the seconds until the table shows ``change``."""
    from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions

    for _ in range(20):
        try:
            driver.find_element("css selector", css).send_keys(Keys.ENTER)
            break
        except (StaleElementReferenceException, ElementNotInteractableException):  # redrawn as it was pressed
            time.sleep(0.1)
    else:
        raise AssertionError(f"{css} could not be pressed")
    if answer is not None:
        dialog = wait(driver, expected_conditions.alert_is_present())
        dialog.send_keys(answer)
        dialog.accept()
    wait(driver, expected_conditions.alert_is_present()).accept()
    start = time.monotonic()
    wait(driver, lambda d: change(d), 10)
    return time.monotonic() - start


def click(driver, css: str) -> None:
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return driver.find_element("css selector", css).click()
        except StaleElementReferenceException:  # redrawn between finding and clicking
            time.sleep(0.1)
    raise AssertionError(f"{css} kept going stale")


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def send(driver, model: str, prompt: str) -> None:
    from selenium.webdriver.support.ui import Select

    wait(driver, lambda d: d.find_elements("css selector", f"#model-select option[value='{model}']"))
    Select(driver.find_element("id", "model-select")).select_by_value(model)
    box = driver.find_element("id", "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.find_element("id", "send").click()
    wait(driver, lambda d: "completion tokens" in text(d, "stats-a") or "Error" in text(d, "answer-a"), 60)
    assert "completion tokens" in text(driver, "stats-a"), text(driver, "answer-a")


def test_console_in_a_real_browser(console, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    driver, url = browser, console
    driver.get(f"{url}/ui/")
    wait(driver, lambda d: d.find_element("id", "page-key").is_displayed())
    shot(driver, "key")
    sign_in(driver, url, "acme")

    # playground: a streamed answer from the base model, then an adapter version side by side with the base
    send(driver, "base", "Say hello.")
    assert text(driver, "answer-a") and "first token" in text(driver, "stats-a")
    wait(driver, lambda d: d.find_elements("css selector", "#compare-select option[value='base']"))
    Select(driver.find_element("id", "compare-select")).select_by_value("base")
    send(driver, "tone@2", "Say hello.")
    wait(driver, lambda d: "completion tokens" in text(d, "stats-b"))
    assert text(driver, "title-a") == "tone@2" and text(driver, "title-b") == "base"
    shot(driver, "playground")
    Select(driver.find_element("id", "compare-select")).select_by_value("")
    driver.find_element("id", "json-mode").click()  # JSON mode: the grammar makes the answer a JSON object
    send(driver, "base", "Describe a cat as JSON.")
    assert text(driver, "answer-a").lstrip().startswith("{"), text(driver, "answer-a")
    driver.find_element("id", "json-mode").click()

    # models: acme sees its own adapter and not bob's
    driver.get(f"{url}/ui/#models")
    wait(driver, lambda d: "tone" in rows(d))
    listed = rows(driver)
    assert {"tone", "tone@1", "tone@2"} <= set(listed) and not any(m.startswith("secret") for m in listed)

    # fine-tuning: a bad file's line number, then a real job to its loss curve
    driver.get(f"{url}/ui/#finetune")
    wait(driver, lambda d: d.find_element("id", "page-finetune").is_displayed())
    bad = tmp_path / "bad.jsonl"
    lines = (EXAMPLES / "train.jsonl").read_text().splitlines()
    bad.write_text(lines[0] + "\n{not json\n")
    driver.find_element("id", "file-input").send_keys(str(bad))
    driver.find_element("id", "upload").click()
    wait(driver, lambda d: "bad.jsonl:2" in text(d, "upload-result"))
    assert "invalid JSON" in text(driver, "upload-result")
    good = tmp_path / "train.jsonl"
    good.write_text("\n".join(lines[:64]) + "\n")
    driver.find_element("id", "file-input").clear()
    driver.find_element("id", "file-input").send_keys(str(good))
    driver.find_element("id", "upload").click()
    wait(driver, lambda d: text(d, "upload-result").startswith("Uploaded train.jsonl"))
    for field, value in (("job-suffix", "mood"), ("job-epochs", "1"), ("job-batch", "8"), ("job-lr", "50"),
                         ("job-extra", json.dumps(EXT))):
        box = driver.find_element("id", field)
        box.clear()
        box.send_keys(value)
    shot(driver, "finetune")
    driver.find_element("id", "create-job").click()
    wait(driver, lambda d: d.find_element("id", "page-job").is_displayed())
    wait(driver, lambda d: text(d, "job-status") in ("succeeded", "failed", "cancelled")
         or text(d, "job-status").startswith("failed"), 300)
    assert text(driver, "job-status") == "succeeded"
    points = driver.find_element("css selector", "#loss-curve polyline").get_attribute("points").split()
    assert len(points) >= 2  # one per logged step
    assert driver.find_elements("css selector", "#job-eval tbody tr")  # eval before / after
    shot(driver, "job")
    driver.find_element("id", "try-model").click()
    wait(driver, lambda d: d.find_element("id", "page-playground").is_displayed()
         and d.execute_script("return document.getElementById('model-select').value") == "mood@1")
    send(driver, "mood@1", "Say hello.")  # the new version answers
    assert text(driver, "title-a") == "mood@1"

    # an admin, by keyboard: Tab to the Models link, Enter; then promote, canary, roll back and delete, each
    # confirmed in its dialog and shown by the page
    from selenium.webdriver.common.keys import Keys

    sign_in(driver, url, "ops")  # focus lands in the message box; the nav is behind it
    for _ in range(30):
        if (driver.switch_to.active_element.get_attribute("href") or "").endswith("#models"):
            break
        driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait(driver, lambda d: d.find_element("id", "page-models").is_displayed() and "tone" in rows(d))
    assert rows(driver)["tone"] == "tone@1"
    took = {"promote": confirmed(driver, "button.promote[data-model='tone@2']",
                                 lambda d: rows(d).get("tone") == "tone@2")}
    assert any(m.startswith("secret") for m in rows(driver))  # the admin sees every tenant's adapters
    took["canary"] = confirmed(driver, "button.canary[data-model='tone@1']",
                               lambda d: "tone@1 25%" in rows(d, "canary-share").get("tone", ""), answer="0.25")
    shot(driver, "models")
    took["rollback"] = confirmed(driver, "button.rollback[data-model='tone']",  # ends the canary
                                 lambda d: rows(d, "canary-share").get("tone") == "")
    # a change made elsewhere (the API, another admin) reaches the open page by itself
    r = httpx.post(f"{url}/v1/adapters/tone/promote", headers={"Authorization": f"Bearer {KEYS['ops']}"},
                   json={"version": 1}, timeout=30)
    assert r.status_code == 200, r.text
    start = time.monotonic()
    wait(driver, lambda d: rows(d).get("tone") == "tone@1", 10)
    took["change elsewhere"] = time.monotonic() - start
    took["delete"] = confirmed(driver, "button.delete[data-model='tone@2']", lambda d: "tone@2" not in rows(d))
    print("models page shows each change after (s):", {k: round(v, 2) for k, v in took.items()})
    driver.get(f"{url}/ui/#usage")
    wait(driver, lambda d: d.find_elements("css selector", "#usage tbody tr") and "replica" in text(d, "health"))
    assert "KV cache" in text(driver, "health")
    latency = driver.execute_script("return [...document.querySelectorAll('#usage tbody tr')].map("
                                    "r => r.children[6].textContent)")  # Avg latency (ms)
    assert any(cell.replace(".", "", 1).isdigit() and float(cell) > 0 for cell in latency), latency
    shot(driver, "usage")

    # a narrow window: nothing wider than the screen
    driver.set_window_size(400, 850)
    driver.get(f"{url}/ui/#playground")
    wait(driver, lambda d: d.find_element("id", "page-playground").is_displayed())
    time.sleep(0.5)
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot(driver, "narrow")
    driver.set_window_size(1200, 900)


def test_console_files_are_public_but_hold_no_data(console):
    page = httpx.get(f"{console}/ui/", timeout=30)
    assert page.status_code == 200 and "llmaas console" in page.text
    assert "fonts.googleapis" not in page.text and "cdn" not in page.text.lower()  # runs without internet
    assert httpx.get(f"{console}/v1/models", timeout=30).status_code == 401  # the data still needs a key
    status = httpx.get(f"{console}/v1/status", headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=30)
    assert status.status_code == 403 and status.json()["error"]["code"] == "admin_required"
