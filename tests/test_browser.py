"""`05_xpred` as a reader meets it: JupyterLab in headless Chromium, Run All with the default budget, then the slider.

The test starts JupyterLab on 127.0.0.1 (a free port, a random token) in a temporary folder that holds a copy of the
notebook and of `pyproject.toml`, so neither autosave nor the notebook's export cell touches the checkout. It clicks
Run > Run All Cells, waits for the kernel, checks that no cell shows an error, that the slider over t renders as a
slider, and that moving it changes the trained model's x̂₀ images.
It needs Debian's `chromium` and `chromium-driver` and the `selenium` package (`.ci/run` installs them); without them
it skips and says which one is missing. `PIXELDIFF_BROWSER_TIMEOUT` bounds the wait for Run All (seconds, default 1500).
"""
import base64, io, os, secrets, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = '05_xpred.ipynb'
RUN_ALL_TIMEOUT = float(os.environ.get('PIXELDIFF_BROWSER_TIMEOUT', 1500))

def _find(*names):
    return next((p for p in map(shutil.which, names) if p), None)

CHROMIUM, DRIVER = _find('chromium', 'chromium-browser'), _find('chromedriver')

def _missing() -> str | None:
    "Why the browser test cannot run here, or None."
    try: import selenium  # noqa: F401
    except ImportError: return 'selenium is not installed: pip install -e ".[dev]"'
    try: import jupyterlab  # noqa: F401
    except ImportError: return 'jupyterlab is not installed: pip install -e ".[dev]"'
    if CHROMIUM is None or DRIVER is None:
        return 'Chromium or chromedriver not found: apt-get install -y chromium chromium-driver (as .ci/run does)'
    return None

pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

@pytest.fixture
def lab():
    "A JupyterLab server over a temporary copy of the notebook; yields (base url, token); always shut down."
    work = Path(tempfile.mkdtemp(prefix='pixeldiff-lab-'))
    (work/'nbs').mkdir()
    shutil.copy(ROOT/'nbs'/NB, work/'nbs'/NB)
    shutil.copy(ROOT/'pyproject.toml', work/'pyproject.toml')   # the notebook's last cell exports into this copy
    port, token = _free_port(), secrets.token_hex(16)
    drop = ('MPLBACKEND', 'PIXELDIFF_FULL')                      # inline figures, the default budget
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]), JUPYTER_RUNTIME_DIR=str(work/'rt'),
               JUPYTERLAB_SETTINGS_DIR=str(work/'settings'), JUPYTERLAB_WORKSPACES_DIR=str(work/'workspaces'))
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={work/"nbs"}', '--ServerApp.port_retries=0',
           '--LabApp.expose_app_in_browser=True', '--LabApp.news_url=', '--LabApp.check_for_updates_class='
           'jupyterlab.NeverCheckForUpdate', '--ServerApp.allow_root=True']
    log = open(work/'lab.log', 'w')
    proc = subprocess.Popen(cmd, cwd=work/'nbs', env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None: pytest.fail(f'JupyterLab exited: {(work/"lab.log").read_text()[-3000:]}')
            try:
                urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=5)
                break
            except OSError:
                if time.time() > deadline: pytest.fail('JupyterLab did not answer within 120 s')
                time.sleep(1)
        yield url, token, work
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)

@pytest.fixture
def browser():
    "Headless Chromium driven by the system chromedriver (no download)."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault('SE_OFFLINE', 'true')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--window-size=1400,1000'):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(120)
    drv.set_script_timeout(60)
    try: yield drv
    finally: drv.quit()

def _wait(pred, timeout, what, every=1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v: return v
        time.sleep(every)
    pytest.fail(f'timed out after {timeout:.0f} s waiting for {what}')

# Model-side view of the open notebook: (cells run, code cells, error outputs, kernel status)
STATE_JS = """
const w = window.jupyterapp.shell.currentWidget;
if (!w || !w.content || !w.sessionContext || !w.sessionContext.session) return null;
const cells = Array.from(w.content.model.cells);
const code = cells.filter(c => c.type === 'code');
const errors = [];
for (const c of code) for (const o of c.toJSON().outputs || [])
    if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
return {ran: code.filter(c => c.executionCount).length, code: code.length, errors: errors,
        status: w.sessionContext.kernelDisplayStatus};
"""

def _images(drv):
    "The PNGs inside the slider's output area, as PIL images."
    from PIL import Image
    srcs = drv.execute_script("""return Array.from(document.querySelectorAll('.widget-interact img'))
                                 .map(i => i.getAttribute('src'));""")
    return [Image.open(io.BytesIO(base64.b64decode(s.split(',', 1)[1]))).convert('L') for s in srcs if s]

def _right_half(im):
    "The x̂₀ half of the slider's picture (columns 4–6 of 6), as a float array."
    import numpy as np
    a = np.asarray(im, dtype=np.float32)
    return a[:, a.shape[1] // 2:]

def test_run_all_and_slider(lab, browser):
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    url, token, work = lab
    drv = browser
    drv.get(f'{url}/lab/tree/{NB}?token={token}')
    _wait(lambda: drv.execute_script('return !!(window.jupyterapp && window.jupyterapp.shell.currentWidget'
                                     ' && window.jupyterapp.shell.currentWidget.sessionContext)'), 120, 'the notebook')
    _wait(lambda: (drv.execute_script(STATE_JS) or {}).get('status') == 'idle', 180, 'an idle kernel')
    # Run > Run All Cells, as a reader does
    def labelled(css, text):
        return [e for e in drv.find_elements(By.CSS_SELECTOR, css) if e.text.strip() == text]
    _wait(lambda: labelled('.lm-MenuBar-item', 'Run'), 30, 'the Run menu')[0].click()
    try: _wait(lambda: labelled('.lm-Menu-item', 'Run All Cells'), 30, 'Run All Cells')[0].click()
    except BaseException:
        print([e.text for e in drv.find_elements(By.CSS_SELECTOR, '.lm-Menu-item, .lm-MenuBar-item')][:60])
        raise
    t0 = time.time()
    def finished():
        s = drv.execute_script(STATE_JS)
        if s and s['errors']: pytest.fail(f'a cell failed under Run All: {s["errors"]}')
        return s if s and s['ran'] == s['code'] and s['status'] == 'idle' else None
    state = _wait(finished, RUN_ALL_TIMEOUT, 'Run All to finish', every=3)
    print(f'Run All: {state["ran"]} code cells in {time.time() - t0:.0f} s (wall)')
    # the slider renders as a slider (a widget, not the text repr of one) with its value
    slider = _wait(lambda: drv.find_elements(By.CSS_SELECTOR, '.widget-interact .widget-hslider'), 60, 'the slider')[0]
    assert slider.is_displayed()
    texts = [e.text for e in drv.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output pre')]
    assert not [t for t in texts if 'interactive(children=' in t]    # not the widget's text repr
    readout = slider.find_element(By.CSS_SELECTOR, '.widget-readout')
    assert readout.text.strip() in ('0.50', '0.5'), readout.text
    before = _wait(lambda: _images(drv), 60, "the slider's picture")
    xh0 = _right_half(before[0])
    assert xh0.std() > 5, 'the x̂₀ images are flat: is the model trained?'
    # move it: keyboard on the handle, as a reader can; t goes 0.50 -> 0.80
    handle = slider.find_element(By.CSS_SELECTOR, '.noUi-handle')
    drv.execute_script('arguments[0].scrollIntoView({block: "center"});', handle)
    handle.click()
    for _ in range(6): handle.send_keys(Keys.ARROW_RIGHT)
    _wait(lambda: readout.text.strip() == '0.80', 30, 'the readout to show 0.80')
    def changed():
        ims = _images(drv)
        if not ims or _right_half(ims[0]).shape != xh0.shape: return None
        return ims if np.abs(_right_half(ims[0]) - xh0).mean() > 1 else None
    after = _wait(changed, 120, 'the x̂₀ images to change')
    assert _right_half(after[0]).std() > 5
