"""The widget panels in a real browser: JupyterLab on 127.0.0.1, headless Chromium driven through Selenium.

Notebook 04: run all cells, click the optimization panel's Run button, see the progress bar move and the figure
appear. Notebook 05: drag the post-processing panel's dilation slider and see the figure redrawn.

The server runs on a copy of the notebooks in a temporary folder (the repository's are never touched), with CI=true
in its environment so that the notebooks take their smoke path, a token, a free port, and temporary Jupyter
config, data and runtime folders. The test skips, with the reason, where Chromium, chromedriver, Selenium or
JupyterLab is missing (Debian: ``apt-get install chromium chromium-driver``).
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("04_optimization.ipynb", "05_postprocessing.ipynb")
SERVER_WAIT = 90   # s for JupyterLab to answer
KERNEL_WAIT = 120  # s for the kernel to start (torch's import alone takes a while on a slow shared machine)
RUN_WAIT = 420     # s for a notebook's cells to run all through on their smoke path
WIDGET_WAIT = 120  # s for a panel to answer a click or a slider


def _need(*names: str) -> str:
    """The path of the first program among ``names`` on PATH; skip the test where none is."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"{' / '.join(names)} not found: the browser test needs Chromium and its driver "
                "(Debian: apt-get install chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, method: str = "GET"):
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def _notebook_copy(src: Path, dst: Path) -> None:
    """``src`` without its outputs, execution counts and saved widget state: every prompt and widget on the page
    is then one this run made."""
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)
    dst.write_text(json.dumps(nb, indent=1))


class Lab:
    """A JupyterLab server: ``url(path)`` opens a path with the token."""

    def __init__(self, base: Path):
        self.base, self.port, self.token = base, _free_port(), secrets.token_hex(16)
        self.root = base / "notebooks"
        self.root.mkdir()
        for name in NOTEBOOKS:
            _notebook_copy(ROOT / "notebooks" / name, self.root / name)
        config = base / "jupyter-config"
        settings = config / "lab" / "user-settings" / "@jupyterlab"
        # every cell stays in the page (no windowing), and no news or update toast covers the panels
        for path, values in {settings / "notebook-extension" / "tracker.jupyterlab-settings": {"windowingMode": "none"},
                             settings / "apputils-extension" / "notification.jupyterlab-settings":
                                 {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}}.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = {**os.environ, "CI": "true", "JUPYTER_CONFIG_DIR": str(config),
               "JUPYTER_DATA_DIR": str(base / "jupyter-data"), "JUPYTER_RUNTIME_DIR": str(base / "jupyter-runtime"),
               "IPYTHONDIR": str(base / "ipython"),
               # the kernel imports this checkout's deepexplain, whatever the environment has installed
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.log_path = base / "jupyterlab.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", "--ServerApp.allow_root=True",
             f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=", "--ServerApp.terminals_enabled=False",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_until_up()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + SERVER_WAIT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                _api(self.url("api/status"))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not answer in {SERVER_WAIT} s:\n{self.log_tail()}")
                time.sleep(0.5)

    def kernel_ready(self, name: str) -> bool:
        """Whether notebook ``name``'s kernel is idle with the page connected to it."""
        kernels = [session["kernel"] for session in _api(self.url("api/sessions")) if session["path"] == name]
        return any(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels)

    def close_sessions(self) -> None:
        """Shut every notebook's kernel down."""
        for session in _api(self.url("api/sessions")):
            _api(self.url(f"api/sessions/{session['id']}"), method="DELETE")

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Shut the kernels down through the API, then the server (SIGTERM, then SIGKILL)."""
        try:
            self.close_sessions()
        except OSError:
            pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def programs() -> dict:
    """Chromium's and chromedriver's paths, once Selenium and JupyterLab are known to be there; else skip."""
    found = {"chromium": _need("chromium", "chromium-browser", "google-chrome"), "chromedriver": _need("chromedriver")}
    pytest.importorskip("selenium", reason="the browser test needs Selenium (pip install selenium)")
    pytest.importorskip("jupyterlab", reason="the browser test needs JupyterLab (pip install jupyterlab)")
    return found


@pytest.fixture(scope="module")
def lab(programs, tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("lab"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(programs, lab):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = programs["chromium"]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1600,1200", f"--user-data-dir={lab.base / 'chromium-profile'}"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=programs["chromedriver"],
                                      log_output=str(lab.base / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, lab, seconds, what, condition):
    """``condition(driver)``'s first truthy value within ``seconds``; else fail, saying ``what`` and leaving a
    screenshot beside the server's log."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.25).until(condition)
    except TimeoutException:
        shot = lab.base / f"failed-{int(time.time())}.png"
        driver.save_screenshot(str(shot))
        pytest.fail(f"no {what} within {seconds} s (screenshot {shot}); JupyterLab's log ends:\n{lab.log_tail()}")


#: Which code cells ran: "error" when an output shows a traceback, else "done" when every prompt has a number.
_RUN_STATE = """
const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
const texts = prompts.map(p => p.textContent.trim());
const failed = [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .some(o => o.textContent.includes('Traceback'));
if (failed) return 'error';
return prompts.length && texts.every(t => /^\\[\\d+\\]:$/.test(t)) ? 'done' : null;
"""


def open_and_run_all(driver, lab, name: str) -> None:
    """Open notebook ``name`` in a fresh workspace, wait for its kernel, run all cells and wait until they ran."""
    from selenium.webdriver.common.by import By

    lab.close_sessions()  # the previous notebook's kernel leaves the two cores to this one
    driver.get(lab.url(f"lab/tree/{name}") + "&reset")
    # the page's kernel indicator reads 'idle' for a moment before any kernel exists: ask the server too
    wait(driver, lab, KERNEL_WAIT, f"idle kernel for {name}", lambda d: lab.kernel_ready(name) and d.find_elements(
        By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"))
    menu = wait(driver, lab, 30, "Run menu", lambda d: [item for item in d.find_elements(
        By.CSS_SELECTOR, ".lm-MenuBar-item") if item.text.strip() == "Run"])
    menu[0].click()
    wait(driver, lab, 30, "Run All Cells item", lambda d: [item for item in d.find_elements(
        By.CSS_SELECTOR, ".lm-Menu-item .lm-Menu-itemLabel") if item.text.strip() == "Run All Cells"])[0].click()
    state = wait(driver, lab, RUN_WAIT, f"finished run of {name}", lambda d: d.execute_script(_RUN_STATE))
    if state == "error":
        shot = lab.base / f"error-{name}.png"
        driver.save_screenshot(str(shot))
        pytest.fail(f"a cell of {name} raised (screenshot {shot})")


def figure_source(driver):
    """The panel figure's image source once the browser has decoded it, else None."""
    return driver.execute_script(
        "const img = document.querySelector('img.deepexplain-figure, .deepexplain-figure img');"
        "return img && img.complete && img.naturalWidth > 0 ? img.src : null;")


def test_optimization_panel_runs_on_click(lab, browser):
    from selenium.webdriver.common.by import By

    open_and_run_all(browser, lab, NOTEBOOKS[0])
    run = wait(browser, lab, WIDGET_WAIT, "Run button", lambda d: d.find_elements(
        By.CSS_SELECTOR, "button.deepexplain-run"))[0]
    assert run.text.strip() == "Run" and run.is_enabled()
    assert figure_source(browser) is None  # nothing drawn before the click
    # record every width the progress bar takes from now on
    start = browser.execute_script("""
        const bar = document.querySelector('.deepexplain-progress .progress-bar');
        window.progressWidths = [];
        new MutationObserver(() => window.progressWidths.push(parseFloat(bar.style.width) || 0))
            .observe(bar, {attributes: true, attributeFilter: ['style']});
        return parseFloat(bar.style.width) || 0;""")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", run)
    run.click()
    wait(browser, lab, WIDGET_WAIT, "figure after Run", figure_source)
    wait(browser, lab, WIDGET_WAIT, "Run enabled again", lambda d: run.is_enabled())
    widths = browser.execute_script("return window.progressWidths;")
    assert start == 0 and widths and widths[-1] == 100, widths
    assert any(0 < w < 100 for w in widths), widths  # it moved through the steps, not straight to the end
    assert widths == sorted(widths), widths


def test_postprocessing_slider_redraws_the_figure(lab, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_and_run_all(browser, lab, NOTEBOOKS[1])
    first = wait(browser, lab, WIDGET_WAIT, "post-processing figure", figure_source)
    slider = browser.find_element(By.CSS_SELECTOR, ".deepexplain-dilation")
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
    handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
    before = readout.text.strip()
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
    ActionChains(browser).click_and_hold(handle).move_by_offset(-10, 0).move_by_offset(-10, 0).release().perform()
    wait(browser, lab, WIDGET_WAIT, "slider readout change", lambda d: readout.text.strip() != before)
    assert int(readout.text) < int(before)  # dragged left: a smaller dilation
    wait(browser, lab, WIDGET_WAIT, "redrawn figure", lambda d: figure_source(d) not in (None, first))


def test_panels_carry_the_class_names_these_selectors_use(shapes):
    """Runs without a browser: the CSS class names above are on the panels' widgets."""
    import deepexplain as de

    panel = de.optimization_panel({"star": "star"}, shapes, steps=2)
    assert "deepexplain-panel" in panel.widget._dom_classes and "deepexplain-figure" in panel.image._dom_classes
    assert "deepexplain-run" in panel.run._dom_classes and "deepexplain-progress" in panel.progress._dom_classes
    explanation = de.explain("star", shapes, preset="seed", steps=2, verbose=False)
    assert "deepexplain-dilation" in de.postprocessing_panel(explanation).controls["dilation"]._dom_classes
