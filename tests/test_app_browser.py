"""tsd-app in a real browser: the console script started on a free local port, driven by Selenium in headless Chromium
(Debian's chromium + chromium-driver; skipped without them or without gradio and selenium)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.app_inputs import make_inputs
from tests.helpers.nets import save_tiny_exports
from tests.helpers.run_if import RunIf

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    RunIf(modules=("gradio", "selenium")),
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)"
    ),
]
MAX_FILE_KB = 100  # the app's upload limit here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """tsd-app over a tiny student export, in its own process: (its URL, its project root)."""
    root = tmp_path_factory.mktemp("approot")
    save_tiny_exports(root / "checkpoints", kinds=("student",))
    url = f"http://127.0.0.1:{(port := free_port())}/"
    args = [f"port={port}", f"paths.root_dir={root}", f"max_file_size={MAX_FILE_KB}kb", "+infer.detector=center"]
    env = os.environ | {"GRADIO_TEMP_DIR": str(root / "gradio"), "OMP_NUM_THREADS": "1"}
    with open(root / "app.log", "w") as log:
        app = subprocess.Popen(
            [sys.executable, "-m", "temposyncdiff.cli.app", *args], cwd=root, env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"tsd-app did not start:\n{(root / 'app.log').read_text()}")
                time.sleep(0.5)
        yield url, root
    finally:
        app.terminate()
        try:
            app.wait(timeout=15)
        except subprocess.TimeoutExpired:
            app.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def open_page(browser, url: str, face: Path, audio: Path) -> None:
    """Load the page, upload the face and the speech, and wait until both are in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tsd-face input[type=file]"))
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#tsd-model input").get_attribute("value"))
    browser.find_element(By.CSS_SELECTOR, "#tsd-face input[type=file]").send_keys(str(face))
    browser.find_element(By.CSS_SELECTOR, "#tsd-audio input[type=file]").send_keys(str(audio))
    wait.until(lambda b: face.name in b.find_element(By.CSS_SELECTOR, "#tsd-face").text.replace("\n", ""))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tsd-audio audio"))


def generate(browser) -> None:
    """Click Generate and wait for the video or an error line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, "#tsd-generate").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tsd-video video[src]") or message(b))


def message(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, "#tsd-message").text.strip()


def test_photo_and_speech_to_a_playing_video(server, browser, tmp_path):
    import av
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, root = server
    face, speech, _ = make_inputs(tmp_path)
    open_page(browser, url, face, speech)
    generate(browser)
    assert message(browser) == ""
    video = browser.find_element(By.CSS_SELECTOR, "#tsd-video video")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return arguments[0].readyState", video) >= 2)
    duration, width, height = browser.execute_script(
        "const v = arguments[0]; return [v.duration, v.videoWidth, v.videoHeight]", video
    )
    assert abs(duration - 1.0) < 0.1 and (width, height) == (80, 96)  # 1 s of speech; pasted back into the photo
    played = browser.execute_async_script(
        "const [v, done] = arguments; v.muted = true;"
        "v.play().then(() => setTimeout(() => done(v.currentTime), 400), e => done(String(e)))",
        video,
    )
    assert isinstance(played, float) and played > 0, played
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(u.startswith((url, "data:", "blob:")) for u in fetched), fetched  # nothing from outside
    summary = browser.find_element(By.CSS_SELECTOR, "#tsd-summary").text
    assert "25 frames at 25 fps, 1 s of speech" in summary and "real-time factor" in summary
    assert "x0, y0, x1, y1 = " in summary

    link = browser.find_element(By.CSS_SELECTOR, "#tsd-download a[download]").get_attribute("href")
    (mp4 := tmp_path / "download.mp4").write_bytes(urllib.request.urlopen(link, timeout=10).read())
    (sample,) = (root / "outputs" / "samples").glob("app-*/sample.mp4")
    assert mp4.read_bytes() == sample.read_bytes()
    with av.open(str(mp4)) as container:
        assert container.streams.video[0].codec_context.name == "h264" and container.streams.video[0].frames == 25
        assert container.streams.audio[0].codec_context.name == "aac"
        assert abs(container.duration / av.time_base - 1.0) < 0.1


def test_bad_file_and_huge_upload_are_one_line_in_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    _, speech, broken = make_inputs(tmp_path)
    open_page(browser, url, broken, speech)
    generate(browser)
    assert message(browser) == "error: broken.png: not an image, or a format PIL cannot read"
    assert not browser.find_elements(By.CSS_SELECTOR, "#tsd-video video[src]")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text

    (huge := tmp_path / "huge.png").write_bytes(os.urandom(2 * MAX_FILE_KB * 1000))
    browser.find_element(By.CSS_SELECTOR, "#tsd-face button[aria-label='Clear']").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tsd-face input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#tsd-face input[type=file]").send_keys(str(huge))
    said = f'exceed the maximum allowed size of {MAX_FILE_KB:.1f} Kb: "huge.png"'
    WebDriverWait(browser, 10).until(lambda b: said in b.find_element(By.TAG_NAME, "body").text)
